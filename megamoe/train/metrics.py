"""Per-step metrics: one dict per logged step → a human line, a JSONL record, tensorboard."""

import json
import math
from pathlib import Path

_HUMAN = [("loss", "loss {:.4f}"), ("lm_loss", "lm {:.4f}"), ("lb_loss", "lb {:.3f}"),
          ("z_loss", "z {:.3f}"), ("eval_loss", "eval {:.4f}"), ("eval_ppl", "ppl {:.1f}"),
          ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
          ("mfu", "mfu {:.1%}")]


class MetricsLogger:
    """Writes only on the rank that logs (rank 0); the other ranks hold a disabled logger."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, tensorboard: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self.writer = None
        if not enabled:
            return
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}/{self.total_steps}"]
        parts += [fmt.format(record[k]) for k, fmt in _HUMAN if k in record]
        parts += [f"{k[len('task/'):]} {v:.3f}" for k, v in record.items() if k.startswith("task/")]
        print(" | ".join(parts), flush=True)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            for layer, load in enumerate(record.get("expert_load", [])):
                if load:
                    self.writer.add_scalar(f"experts/max_over_mean_layer{layer}",
                                           max(load) * len(load) / max(sum(load), 1e-12), record["step"])

    def close(self) -> None:
        """Flush and close; safe to call more than once."""
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            self.enabled = False
