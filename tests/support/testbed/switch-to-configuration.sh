# Body of the test double for NixOS's switch-to-configuration.
#
# The flake's builder prepends a header that sets: toplevel, attr,
# activation_exit, extra_lines, lines_per_second, sleep_ticks, network.
# Messages and exit codes follow nixpkgs' switch-to-configuration:
# progress on stderr; 0 ok, 1 usage/bootloader, 2 activation script failed,
# 3 daemon-reload/tmpfiles failed, 4 a unit failed, 100 reboot needed.
# The testbed lets a node without root redirect /run/current-system through
# TESTBED_CURRENT_SYSTEM (real NixOS has no such variable).
PATH=/usr/bin:/bin
export PATH
current_system=${TESTBED_CURRENT_SYSTEM:-/run/current-system}
action=$1

usage() {
    cat >&2 <<EOF
Usage: $0 [switch|boot|test|dry-activate]

switch:       make the configuration the boot default and activate now
boot:         make the configuration the boot default
test:         activate the configuration, but don't make it the boot default
dry-activate: show what would be done if this configuration were activated
EOF
    exit 1
}

case "$action" in
    switch|boot|test|dry-activate) ;;
    *) usage ;;
esac

unit="testbed-$attr.service"

if [ "$action" = dry-activate ]; then
    echo "would stop the following units: $unit" >&2
    echo "would activate the configuration..." >&2
    echo "would restart the following units: nscd.service" >&2
    echo "would start the following units: $unit" >&2
    exit 0
fi

if [ "$action" = switch ] || [ "$action" = boot ]; then
    if [ "$activation_exit" = 1 ]; then
        echo "Failed to install bootloader" >&2
        exit 1
    fi
    if [ "$action" = boot ]; then
        exit 0
    fi
fi

if [ "$activation_exit" = 100 ]; then
    echo "Warning: the new NixOS configuration has an ‘init’ that is incompatible with the current configuration. The new configuration won't take effect until you reboot the system." >&2
    exit 100
fi

echo "stopping the following units: $unit" >&2
echo "activating the configuration..." >&2
echo "setting up /etc..." >&2

if [ "$extra_lines" -gt 0 ] && [ "$lines_per_second" -gt 0 ]; then
    # Paced output for latency measurements: each line starts with the time
    # it was printed (seconds.nanoseconds) and is 75 bytes with its newline.
    # One perl process: a shell loop forking date and sleep per line holds only ~230 lines/s.
    perl -MTime::HiRes=time,sleep -e '$| = 1; my ($n, $r) = @ARGV; my $pad = "." x 33; my $start = time;
        for my $i (1 .. $n) { my $t = time; my $s = int($t);
            printf("%d.%09d paced line %08d %s\n", $s, ($t - $s) * 1e9, $i, $pad);
            my $rest = $start + $i / $r - time; sleep($rest) if $rest > 0; }' "$extra_lines" "$lines_per_second"
elif [ "$extra_lines" -gt 0 ]; then
    # 75 bytes a line including the newline, as fast as seq can print.
    seq -f 'activation output line %012.0f ......................................' 1 "$extra_lines"
fi

tick=1
while [ "$tick" -le "$sleep_ticks" ]; do
    echo "activation in progress: step $tick of $sleep_ticks"
    sleep 0.5
    tick=$((tick + 1))
done

ln -sfn "$toplevel" "$current_system"

# The node's network, as this system configures it. Only a node with a network namespace of its own
# (the testbed marks it in its /run) has an eth0 that is its own to change.
if [ -f /run/testbed/own-netns ]; then
    PATH=/usr/sbin:/sbin:$PATH
    if [ "$network" = down ]; then
        echo "network down $(date +%s.%N)" >> /run/testbed/network.log
        ip link set eth0 down
    else
        ip link set eth0 up && echo "network up $(date +%s.%N)" >> /run/testbed/network.log
    fi
elif [ "$network" = down ]; then
    echo "this testbed node has no network namespace of its own: cannot take its network down" >&2
    exit 2
fi

if [ "$activation_exit" = 2 ]; then
    echo "Activation script snippet 'testbed' failed (1)" >&2
fi

echo "reloading user units for root..." >&2
echo "setting up tmpfiles" >&2

if [ "$activation_exit" = 3 ]; then
    echo "Failed to reload daemon: Connection timed out" >&2
fi

echo "restarting the following units: nscd.service" >&2
echo "starting the following units: $unit" >&2

if [ "$activation_exit" = 4 ]; then
    echo "warning: the following units failed: foo.service" >&2
    echo "" >&2
    echo "× foo.service - Testbed unit that fails" >&2
    echo "     Loaded: loaded (/etc/systemd/system/foo.service; enabled)" >&2
    echo "     Active: failed (Result: exit-code)" >&2
    exit 4
fi

echo "the following new units were started: $unit" >&2

if [ "$activation_exit" != 0 ]; then
    exit "$activation_exit"
fi
exit 0
