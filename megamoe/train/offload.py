"""The AdamW update on the host, for weights that live on the GPU (`optim.offload: cpu`).

The fp32 master weights and both Adam moments (12 bytes a parameter: 83 GB for OLMoE-1B-7B) stay
in host memory; the GPU keeps only the bf16 weights and gradients. One step streams every
parameter through in chunks of at most `CHUNK` elements, three stages overlapped:

    gradient chunk i+1: GPU → pinned host buffer        (copy stream `down`)
    chunk i: host AdamW (torch's fused CPU kernel, all cores) → bf16 into a pinned buffer
    chunk i-1: pinned bf16 weights → GPU                (copy stream `up`)

so the step costs about the host update's memory traffic. On a CPU-only machine the same code runs
with the copies as plain host copies (what the tests exercise).
"""

import torch

CHUNK = 1 << 25  # elements per streamed chunk: 64 MiB of bf16 gradient, 128 MiB of fp32 scratch


class HostAdamW:
    """Steps parameters whose optimizer state is on the host; reuses its staging buffers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._staging: dict[tuple, list[torch.Tensor]] = {}  # (role, dtype) -> two host buffers
        if self.cuda:
            self.down, self.up = torch.cuda.Stream(device), torch.cuda.Stream(device)
            self._fetched = [torch.cuda.Event() for _ in range(2)]
            self._sent = [torch.cuda.Event() for _ in range(2)]

    def step(self, items: list[tuple], grad_scale: float) -> None:
        """items: (param, master, exp_avg, exp_avg_sq, hyper) per parameter, with `hyper` the
        keyword arguments of torch's fused AdamW and the step count already advanced. The master
        and moments are fp32 host tensors; param and its gradient live on `self.device`."""
        chunks = [(k, s, min(s + CHUNK, item[0].numel())) for k, item in enumerate(items)
                  for s in range(0, item[0].numel(), CHUNK)]
        if not chunks:
            return
        self._size = max(e - s for _, s, e in chunks)
        if self.cuda:  # the gradients are complete once the backward's stream gets here
            self.down.wait_stream(torch.cuda.current_stream(self.device))
            self.up.wait_stream(torch.cuda.current_stream(self.device))
        self._fetch(items, chunks[0], 0)
        for i, (k, s, e) in enumerate(chunks):
            if i + 1 < len(chunks):
                self._fetch(items, chunks[i + 1], (i + 1) % 2)
            slot, n = i % 2, e - s
            p, master, exp_avg, exp_avg_sq, hyper = items[k]
            if self.cuda:
                self._fetched[slot].synchronize()
            g = self._buffers("scratch", torch.float32)[0][:n]  # the gradient in fp32, scaled
            g.copy_(self._buffers("grad", p.grad.dtype)[slot][:n])
            if grad_scale != 1.0:
                g.mul_(grad_scale)
            w = master.view(-1)[s:e]
            torch._fused_adamw_([w], [g], [exp_avg.view(-1)[s:e]], [exp_avg_sq.view(-1)[s:e]], [],
                                [hyper["step"]], lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                                weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=False,
                                maximize=False)
            if self.cuda:
                self._sent[slot].synchronize()  # the copy that last read this buffer is done
            out = self._buffers("weight", p.dtype)[slot][:n]
            out.copy_(w)  # bf16 weights: rounded to nearest-even, as the GPU kernel does
            self._copy(p.data.view(-1)[s:e], out, "up", slot)
        if self.cuda:  # the next forward reads the new weights
            torch.cuda.current_stream(self.device).wait_stream(self.up)

    def _buffers(self, role: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """Two host buffers of the step's largest chunk (page-locked with a GPU: asynchronous
        copies); kept from step to step."""
        key = (role, dtype)
        if key not in self._staging or self._staging[key][0].numel() < self._size:
            self._staging[key] = [torch.empty(self._size, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
        return self._staging[key]

    def _fetch(self, items, chunk, slot: int) -> None:
        k, s, e = chunk
        src = items[k][0].grad.view(-1)[s:e]
        self._copy(self._buffers("grad", src.dtype)[slot][:e - s], src, "down", slot)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, direction: str, slot: int) -> None:
        """dst ← src: on a GPU asynchronously on the direction's stream, recording the slot's event."""
        if not self.cuda:
            dst.copy_(src)
            return
        stream, event = (self.up, self._sent[slot]) if direction == "up" else (self.down, self._fetched[slot])
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event.record(stream)
