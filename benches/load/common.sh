# Sourced by the load scripts, once $WORK is set.

# Waits for something to listen on 127.0.0.1:PORT, up to WAIT_S seconds
# [10]; fails with the logs under $WORK if PID exits first.
wait_port() { # port, pid, name
    local _
    for _ in $(seq 1 $((${WAIT_S:-10} * 20))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "$3 exited before listening on $1; its log:" >&2
            tail -n 20 "$WORK"/*.log "$WORK"/logs/*.log >&2 || true
            exit 1
        fi
        sleep 0.05
    done
    echo "$3 is not listening on $1 after ${WAIT_S:-10} s" >&2
    exit 1
}
