"""The run contract every entry point keeps: one error type users see, and one exit code per outcome.

A user error is one line on stderr (``retmask: error: <what, where, what to do>``); tracebacks are for
bugs only. Exit codes, the same for ``retmask ...`` and ``python -m jobs.*``:

    0    done
    1    user error (bad input, refused run), or a check (``retmask inspect``) that found problems
    2    usage error (unknown option, missing argument): the usage message, no traceback
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM): what is committed stays, rerun to resume

``&&`` chains rely on this: ``retmask generate ... && retmask train ...`` never trains on a run that was
interrupted or refused.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from typing import Any, Callable, NoReturn

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
RESUME_HINT = "rerun the same command to resume"


class RetmaskError(Exception):
    """Bad input or environment; entry points print it as one line and exit 1."""


_terminated = False


# Credentials in URIs: userinfo (``s3://KEY:SECRET@bucket``) and query parameters that carry secrets
# (``?access_key=...&secret_key=...&session_token=...``, presigned ``X-Amz-Signature``).
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]*@")
_SECRET_PARAM = re.compile(
    r"([?&])([^=&\s#]*(?:key|secret|token|password|passwd|signature|credential)[^=&\s#]*)=[^&\s#]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with credentials in any URI it contains removed (userinfo dropped, secret parameters blanked)."""
    text = _USERINFO.sub(r"\1", text)
    return _SECRET_PARAM.sub(r"\1\2=***", text)


def redact_all(value: Any) -> Any:
    """``redact`` applied to every string inside nested dicts and lists (run configs before they are written)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value


def _redacting_factory(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call is logging's to report, not ours
            return record
        if "://" in message:
            record.msg, record.args = redact(message), None
        return record

    factory.retmask_redacting = True  # type: ignore[attr-defined]
    return factory


def install_log_redaction() -> None:
    """Every log record of this process passes through ``redact`` (idempotent)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "retmask_redacting", False):
        logging.setLogRecordFactory(_redacting_factory(current))


def _terminate(signum, frame) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks, the writer's cleanup, Ray's shutdown) but exits 143.

    A KeyboardInterrupt, not an exception of our own: libraries turn only that one into a clean interruption
    (Ray's blocking calls return any other exception raised in a signal handler as a SystemError).
    """
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def stop_line(code: int, prog: str = "retmask") -> str:
    """The run contract's one line for a run stopped by Ctrl-C (``EXIT_INTERRUPTED``) or SIGTERM."""
    what = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
    return f"{prog}: {what}; committed work is kept: {RESUME_HINT}"


def run_cli(main: Callable[[], Any], prog: str = "retmask") -> NoReturn:
    """Run ``main`` under the run contract and exit: an int result is the exit code, None means 0."""
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. called from a test runner thread): keep the default
        pass
    install_log_redaction()
    try:
        code = main()
    except RetmaskError as err:
        print(f"{prog}: error: {redact(str(err))}", file=sys.stderr)
        code = EXIT_USER
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except SystemExit as exit_:  # argparse usage errors (2), typer's own exits, sys.exit in a stage
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USER)
        if not isinstance(exit_.code, (int, type(None))):
            print(f"{prog}: error: {redact(str(exit_.code))}", file=sys.stderr)
    if code == EXIT_INTERRUPTED and _terminated:  # typer reports both as 130
        code = EXIT_TERMINATED
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        print(stop_line(code, prog), file=sys.stderr)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
