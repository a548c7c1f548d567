"""Per-step metrics: one dict per logged step → a human line, a JSONL record, tensorboard."""

import json
import math
from pathlib import Path

from ..analysis.load import heatmap_image

_HUMAN = [("loss", "loss {:.4f}"), ("lm_loss", "lm {:.4f}"), ("lb_loss", "lb {:.3f}"),
          ("z_loss", "z {:.3f}"), ("eval_loss", "eval {:.4f}"), ("eval_ppl", "ppl {:.1f}"),
          ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
          ("mfu", "mfu {:.1%}"), ("max_memory_gib", "mem {:.1f} GiB")]
# per-MoE-layer lists: the console shows the worst layer, tensorboard every layer
_PER_LAYER = [("load_max_over_mean", "max/mean {:.2f}"), ("load_cv", "cv {:.2f}"),
              ("dropped_fraction", "dropped {:.1%}"), ("bias_spread", "bias spread {:.3f}")]


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
        parts += [fmt.format(max(record[k])) for k, fmt in _PER_LAYER if record.get(k)]
        parts += [f"{k[len('task/'):]} {v:.3f}" for k, v in record.items() if k.startswith("task/")]
        print(" | ".join(parts), flush=True)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            for key, _ in _PER_LAYER:  # layer r: the r-th MoE layer
                for layer, value in enumerate(record.get(key, [])):
                    self.writer.add_scalar(f"experts/{key}_layer{layer}", value, record["step"])
            if "eval_loss" in record and record.get("expert_load"):  # every eval interval
                self.writer.add_image("experts/load_heatmap", heatmap_image(record["expert_load"]),
                                      record["step"])

    def close(self) -> None:
        """Flush and close; safe to call more than once."""
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            self.enabled = False
