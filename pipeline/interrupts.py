"""Signals during a vLLM engine start: Ctrl-C and SIGTERM still exit 130 / 143 with no process left.

vLLM 0.32's engine start swallows a KeyboardInterrupt in its handshake with the engine processes
(``zmq_socket_ctx``), then waits up to ``VLLM_ENGINE_READY_TIMEOUT_S`` for a ready message from processes that
died of the same signal (a terminal's Ctrl-C reaches the whole process group). ``asyncio.Runner``'s own SIGINT
handler only cancels a task that is blocked inside the start. So every verb that starts an engine in its own
process (eval, the demo, the study, serve) wraps the start in ``interruptible_engine_start``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STUCK_S = 15.0  # seconds an interrupted start may take to unwind before the process exits on its own


@contextlib.contextmanager
def interruptible_engine_start():
    """Raise at once on SIGINT / SIGTERM, report a start that fails after one as the interruption, and if the
    start has not unwound ``STUCK_S`` after the signal, kill this process's children and exit with the signal's
    code (130 / 143), after the run contract's one line.

    Signals that are ignored here (Ray workers ignore SIGINT) stay ignored, a SIGTERM handler already in place
    (``run_cli``'s, Ray's) still runs, and the previous handlers come back on exit. Outside the main thread
    (where handlers cannot be set) it does nothing.
    """
    from retrieval_heads.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, stop_line

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    unwound = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not signal.SIG_IGN}

    def exit_if_stuck(signum: int) -> None:
        if unwound.wait(STUCK_S):
            return
        import psutil

        code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED
        print(stop_line(code), file=sys.stderr, flush=True)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(code)

    def handle(signum, frame):
        if not received:
            received.append(signum)
            threading.Thread(target=exit_if_stuck, args=(signum,), daemon=True).start()
        chained = previous[signum]
        if signum == signal.SIGTERM and callable(chained):
            chained(signum, frame)  # run_cli's marks the exit code 143 (then raises KeyboardInterrupt)
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    except Exception:
        if received:  # the engine's processes died of the same signal before it reached this process
            raise KeyboardInterrupt from None
        raise
    finally:
        unwound.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
