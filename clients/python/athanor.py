"""Athanor's helper for Python experiments: no dependencies, one file.

Run under an Athanor worker (as a command experiment), it talks to the worker over the
events pipe named by ATHANOR_EVENTS_FD: one JSON object per line. Run by hand, it
prints instead, so the same script works on a laptop (metrics excepted: a training
loop's thousands of points would drown its output; they go nowhere).

    import athanor
    cfg = athanor.config()                  # the run's config, defaults applied
    athanor.log("starting", level="info")
    athanor.progress(3, 10, "epoch 3")
    athanor.result("accuracy", 0.93)
    athanor.metric("loss", 0.31, step=100)  # a point of the loss curve
    athanor.metrics({"loss": 0.31, "acc": 0.9}, step=100)
    if athanor.cancelled(): ...             # after the run was cancelled (SIGTERM)

Python's logging can go the same way, levels kept:
    logging.getLogger().addHandler(athanor.LogHandler())
"""

import json
import logging
import operator
import os
import signal
import sys
import threading

__all__ = [
    "config", "run_id", "experiment", "under_athanor", "log", "result", "metric",
    "metrics", "progress", "fail", "cancelled", "LogHandler",
]

_lock = threading.Lock()
_events = None
_events_opened = False
_cancelled = threading.Event()
_watching_cancel = False
# The steps metric() and metrics() take when given none; guarded by _steps_lock.
_steps_lock = threading.Lock()
_last_step = {}  # metric name -> the last step it was recorded at
_last_metrics_step = None  # the last step metrics() recorded at

MAX_STEP = 2**63 - 1


def under_athanor():
    """True when this process was started by an Athanor worker."""
    return "ATHANOR_EVENTS_FD" in os.environ


def run_id():
    """This run's id, or None when not under Athanor."""
    return os.environ.get("ATHANOR_RUN_ID")


def experiment():
    """The experiment's name, or None when not under Athanor."""
    return os.environ.get("ATHANOR_EXPERIMENT")


def config(defaults=None):
    """The run's config: a dict, validated by the worker with defaults applied.

    Not under Athanor, `defaults` (or an empty dict) is returned, so a script can be
    run by hand."""
    path = os.environ.get("ATHANOR_CONFIG_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    text = os.environ.get("ATHANOR_CONFIG")
    if text:
        return json.loads(text)
    return dict(defaults or {})


def _channel():
    global _events, _events_opened
    if not _events_opened:
        _events_opened = True
        fd = os.environ.get("ATHANOR_EVENTS_FD")
        if fd is not None:
            try:
                _events = os.fdopen(int(fd), "w", encoding="utf-8", errors="replace",
                                    buffering=1, closefd=False)
            except (OSError, ValueError) as e:
                print(f"athanor: cannot open the events pipe {fd!r}: {e}", file=sys.stderr)
    return _events


def _finite(value):
    """JSON has no NaN or infinities: they travel as the strings "NaN", "Infinity"
    and "-Infinity"."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _send(event, fallback):
    with _lock:
        channel = _channel()
        if channel is None:
            if fallback is not None:
                print(fallback, file=sys.stderr, flush=True)
            return
        line = json.dumps(_finite(event), ensure_ascii=False, default=str, allow_nan=False)
        channel.write(line + "\n")
        channel.flush()


_LEVELS = {"trace", "debug", "info", "warn", "warning", "error", "critical"}


def log(message, level="info", **metadata):
    """A log line with a level (trace, debug, info, warn, error) and optional
    structured metadata (keyword arguments, any JSON value)."""
    level = str(level).lower()
    if level not in _LEVELS:
        level = "info"
    event = {"type": "log", "level": level, "message": str(message)}
    if metadata:
        event["metadata"] = metadata
    _send(event, f"[{level}] {message}")


def result(key, value):
    """Records a result; recording a key again replaces its value. NaN and infinities
    are recorded as the strings "NaN", "Infinity" and "-Infinity" (JSON has none)."""
    _send({"type": "result", "key": str(key), "value": value}, f"result {key} = {value!r}")


def _step(step):
    step = operator.index(step)  # an int (numpy's too), never a float
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"a metric step is 0 to 2**63-1, not {step}")
    return step


def metric(name, value, step=None):
    """Records the value of metric `name` at `step` (an int, 0 to 2**63-1): a point of
    its curve. Without `step`, the step after the last one `name` was recorded at by
    this process (0 at first). Any float is kept: NaN and infinities are recorded as
    the strings "NaN", "Infinity" and "-Infinity". Recording a name at a step again
    replaces the point. Names are cut to 200 bytes. Not under Athanor, nothing is
    printed."""
    name, value = str(name), float(value)
    if not name:
        raise ValueError("a metric name cannot be empty")
    with _steps_lock:
        step = _last_step.get(name, -1) + 1 if step is None else _step(step)
        _last_step[name] = step
    _send({"type": "metric", "name": name, "step": step, "value": value}, None)


def metrics(values, step=None):
    """Records several metrics at one `step` at once: `values` maps names to floats.
    Without `step`, the step after the last one metrics() recorded at in this process
    (0 at first); metric() without a step then goes on from there for these names.
    An empty `values` records nothing."""
    global _last_metrics_step
    values = {str(k): float(v) for k, v in values.items()}
    if "" in values:
        raise ValueError("a metric name cannot be empty")
    if not values:
        return
    with _steps_lock:
        if step is None:
            step = 0 if _last_metrics_step is None else _last_metrics_step + 1
        else:
            step = _step(step)
        _last_metrics_step = step
        for name in values:
            _last_step[name] = step
    _send({"type": "metrics", "step": step, "values": values}, None)


def progress(current, total, message=None):
    """Reports progress; only the latest report is kept."""
    event = {"type": "progress", "current": int(current), "total": int(total)}
    if message is not None:
        event["message"] = str(message)
    _send(event, f"progress {current}/{total}" + (f" {message}" if message else ""))


def fail(error):
    """Declares the run failed with `error` (it ends when the process exits)."""
    _send({"type": "outcome", "status": "failed", "error": str(error)}, f"failed: {error}")


def cancelled():
    """True once the run has been cancelled.

    The worker asks a command to stop with SIGTERM to its process group. The first
    call to this function takes SIGTERM over (from the main thread), so a script that
    checks it can stop cleanly; a script that never calls it is stopped by SIGTERM
    as usual. After `worker.cancel_grace` the worker sends SIGKILL."""
    global _watching_cancel
    if not _watching_cancel:
        _watching_cancel = True
        try:
            signal.signal(signal.SIGTERM, lambda signum, frame: _cancelled.set())
        except ValueError:
            # Not the main thread: SIGTERM keeps its default action.
            pass
    return _cancelled.is_set()


class LogHandler(logging.Handler):
    """A logging handler that sends records to the run's log with their level."""

    _MAP = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
            logging.ERROR: "error", logging.CRITICAL: "error"}

    def emit(self, record):
        try:
            level = self._MAP.get(record.levelno)
            if level is None:
                level = "debug" if record.levelno < logging.INFO else "error"
            message = self.format(record)
            if under_athanor():
                _send({"type": "log", "level": level, "message": message,
                       "metadata": {"logger": record.name}}, message)
            else:
                print(message, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)
