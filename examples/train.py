"""A toy training loop run as an Athanor command experiment.

Fits y = 3x - 2 (plus noise) with stochastic gradient descent, in plain Python. It
shows what a real training script does under Athanor: reads its config, logs with
Python's logging, draws a tqdm-style progress bar, reports progress, records loss,
accuracy and learning rate as metrics at every step (the UI draws their curves),
records results and stops cleanly when the run is cancelled. Run by hand (`python3 train.py`), it
prints instead and uses the defaults below.
"""

import logging
import os
import random
import sys
import time

try:
    import athanor
except ImportError:  # not installed: use the copy in this repository
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
    import athanor

DEFAULTS = {"epochs": 3, "lr": 0.001, "note": "", "optimizer": "adam", "shuffle": True}
STEPS_PER_EPOCH = 200

log = logging.getLogger("train")


def bar(done, total, started, width=30):
    """A tqdm-style bar: redrawn in place with \\r."""
    filled = int(width * done / total)
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"\r{100 * done // total:3d}%|{'#' * filled}{' ' * (width - filled)}| {done}/{total} [{elapsed:.1f}s, {rate:.0f}it/s]"


def main():
    cfg = athanor.config(DEFAULTS)
    logging.basicConfig(level=logging.INFO, handlers=[athanor.LogHandler()] if athanor.under_athanor() else None,
                        format="%(message)s")
    if cfg["note"]:
        print(f"note: {cfg['note']}")
    rng = random.Random(42)
    data = [(x, 3 * x - 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(STEPS_PER_EPOCH))]
    w, b = 0.0, 0.0
    m_w = m_b = v_w = v_b = 0.0  # adam's moments
    lr = cfg["lr"] * (100 if cfg["optimizer"] == "sgd" else 40)
    epochs = cfg["epochs"]
    log.info("training for %d epochs with %s (lr %g)", epochs, cfg["optimizer"], cfg["lr"])
    step = 0
    loss = float("nan")
    for epoch in range(1, epochs + 1):
        if cfg["shuffle"]:
            rng.shuffle(data)
        started = time.monotonic()
        total_loss = 0.0
        hits = 0  # predictions within 0.25 of the target this epoch
        for i, (x, y) in enumerate(data, start=1):
            if athanor.cancelled():
                sys.stderr.write("\n")
                log.warning("cancelled at epoch %d, step %d", epoch, i)
                athanor.result("stopped_at_epoch", epoch)
                return 0
            err = (w * x + b) - y
            total_loss += err * err
            hits += abs(err) < 0.25
            g_w, g_b = 2 * err * x, 2 * err
            step += 1
            if cfg["optimizer"] == "adam":
                m_w, m_b = 0.9 * m_w + 0.1 * g_w, 0.9 * m_b + 0.1 * g_b
                v_w, v_b = 0.999 * v_w + 0.001 * g_w * g_w, 0.999 * v_b + 0.001 * g_b * g_b
                corr1, corr2 = 1 - 0.9 ** step, 1 - 0.999 ** step
                w -= lr * (m_w / corr1) / ((v_w / corr2) ** 0.5 + 1e-8)
                b -= lr * (m_b / corr1) / ((v_b / corr2) ** 0.5 + 1e-8)
            else:
                w -= lr * g_w
                b -= lr * g_b
            # The epoch's running mean loss and accuracy, at the global step.
            athanor.metrics({"loss": total_loss / i, "accuracy": hits / i, "lr": lr}, step=step)
            sys.stderr.write(bar(i, len(data), started))
            sys.stderr.flush()
            time.sleep(0.005)
        sys.stderr.write("\n")
        loss = total_loss / len(data)
        athanor.metric("epoch_loss", loss, step=step)
        log.info("epoch %d/%d: loss %.4f, w %.3f, b %.3f", epoch, epochs, loss, w, b)
        athanor.progress(epoch, epochs, f"epoch {epoch}: loss {loss:.4f}")
        athanor.result("loss", round(loss, 6))
    athanor.result("weights", {"w": round(w, 4), "b": round(b, 4)})
    athanor.result("converged", abs(w - 3) < 0.1 and abs(b + 2) < 0.1)
    log.info("done: y = %.3fx %+.3f", w, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
