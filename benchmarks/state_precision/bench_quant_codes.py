"""Quantisation error of 8-bit moment codes on real Adam moments: which code to store m and v in.

Trains a small transformer language model (torch.nn, from scratch, on a synthetic corpus of Markov
sources) with float32 AdamW and, at several points of the run, encodes its exact m and v with each
candidate code (one scale per 1024 elements), decodes them and measures

- the relative RMS error of m and of sqrt(v) over all elements,
- the relative RMS error of Adam's update direction u = m / (sqrt(v) + eps), the quantity the step uses,
- the fraction of elements whose v decodes to 0 while m does not (an update of m / eps: unbounded),

Candidates: ``float(E,M)``, this library's code family (a power-of-two scale, per element a float of
E exponent and M mantissa bits counting from the scale / 2^(2^E), m with a sign bit); ``root``, the
earlier code (block maximum as scale, m = a sign(q)(q/127)^2, v = a (q/255)^4); ``fp8``, the hardware
formats e4m3 (m) and e5m2 (v) under a per-block scale. ``python3 benchmarks/state_precision/bench_quant_codes.py``
(CPU, about a minute); writes benchmarks/results/quant_codes_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, os.path.dirname(BENCH))  # the repository root: also_fused, benchmarks.results_io
from also_fused.storage import QUANT_BLOCK  # noqa: E402
from benchmarks.results_io import source_digest  # noqa: E402

EPS = 1e-8


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = x.numel()
    pad = (-n) % QUANT_BLOCK
    return torch.nn.functional.pad(x.flatten().double(), (0, pad)).view(-1, QUANT_BLOCK), n


def float_code(x: torch.Tensor, exp_bits: int, mant_bits: int) -> torch.Tensor:
    """x through a power-of-two block scale s and |x| + o rounded (halves up) to mant_bits bits, o = s/2^(2^E)."""
    b, n = _blocks(x)
    a = b.abs().amax(1, keepdim=True)
    s = torch.exp2((torch.floor(torch.log2(a.clamp_min(1e-300))) + 1).clamp(2 ** exp_bits - 126, 127))
    o = s / 2.0 ** (2 ** exp_bits)
    t = b.abs() + o
    e = torch.floor(torch.log2(t))
    step = torch.exp2(e - mant_bits)
    q = torch.floor(t / step + 0.5) * step
    q = torch.minimum(q, s * (1 - 2.0 ** -(mant_bits + 1)))
    return (torch.sign(b) * (q - o)).flatten()[:n]


def root_code(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The earlier code: scale = block max a; m = a sign(q)(q/127)^2, v = a (q/255)^4."""
    b, n = _blocks(x)
    a = b.abs().amax(1, keepdim=True).clamp_min(1e-300)
    r = b.abs() / a
    if signed:
        q = torch.round(127 * r.sqrt())
        out = torch.sign(b) * a * (q / 127) ** 2
    else:
        q = torch.round(255 * r.sqrt().sqrt())
        out = a * (q / 255) ** 4
    return out.flatten()[:n]


def fp8_code(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Block max scaled to the format's largest finite value, cast to float8 (round to nearest even)."""
    b, n = _blocks(x)
    a = b.abs().amax(1, keepdim=True).clamp_min(1e-300)
    top = torch.finfo(dtype).max
    return ((b / a * top).float().to(dtype).double() * a / top).flatten()[:n]


CODES = {
    "float(3,4) m / float(5,3) v [this library]": (lambda m: float_code(m, 3, 4), lambda v: float_code(v, 5, 3)),
    "float(4,3) m / float(5,3) v": (lambda m: float_code(m, 4, 3), lambda v: float_code(v, 5, 3)),
    "float(2,5) m / float(4,4) v": (lambda m: float_code(m, 2, 5), lambda v: float_code(v, 4, 4)),
    "float(2,5) m / float(5,3) v": (lambda m: float_code(m, 2, 5), lambda v: float_code(v, 5, 3)),
    "float(3,4) m / float(4,4) v": (lambda m: float_code(m, 3, 4), lambda v: float_code(v, 4, 4)),
    "root m (q|q|) / root v (q^4) [earlier]": (lambda m: root_code(m, True), lambda v: root_code(v, False)),
    "fp8 e4m3 m / e5m2 v": (lambda m: fp8_code(m, torch.float8_e4m3fn), lambda v: fp8_code(v, torch.float8_e5m2)),
}


def errors(m: torch.Tensor, v: torch.Tensor, code) -> dict:
    mq, vq = code[0](m), code[1](v)
    md, vd = m.double().flatten(), v.double().flatten()
    u = md / (vd.sqrt() + EPS)
    uq = mq / (vq.clamp_min(0).sqrt() + EPS)

    def rel_rms(a, b):
        return float(((a - b).norm() / b.norm().clamp_min(1e-300)))

    return {"m": rel_rms(mq, md), "sqrt_v": rel_rms(vq.clamp_min(0).sqrt(), vd.sqrt()), "update": rel_rms(uq, u),
            "update_p99_abs_err": float((uq - u).abs().quantile(0.99)) if u.numel() < 2 ** 24 else None,
            "v_zero_m_nonzero": float(((vq == 0) & (mq != 0)).double().mean()),
            # elements that Adam moves by more than a tenth of lr but whose m decodes to 0
            "frozen": float(((u.abs() > 0.1) & (mq == 0)).double().mean())}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, seq: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seq, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--at", type=int, nargs="+", default=[10, 100, 300])
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "quant_codes_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab, seq, batch = 512, 64, 16
    # four Markov sources over disjoint-ish token ranges, as in bench_convergence's corpus
    trans = [torch.softmax(torch.randn(vocab, vocab) * 3, dim=1) for _ in range(4)]
    model = TinyLM(vocab, 128, 2, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, args.steps + 1):
        src = torch.randint(0, 4, (batch,), generator=gen)
        tok = torch.empty(batch, seq + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for i in range(seq):
            probs = torch.stack([trans[int(s)][int(t)] for s, t in zip(src, tok[:, i])])
            tok[:, i + 1] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        logits = model(tok[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tok[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in args.at:
            states = [opt.state[p] for p in model.parameters() if p in opt.state]
            m = torch.cat([s["exp_avg"].flatten() for s in states])
            # per tensor, as the optimizer stores them: blocks never straddle two tensors
            for name, code in CODES.items():
                per = [errors(s["exp_avg"], s["exp_avg_sq"], code) for s in states]
                weights = torch.tensor([s["exp_avg"].numel() for s in states], dtype=torch.float64)
                agg = {k: float(sum(w * p[k] for w, p in zip(weights, per) if p[k] is not None) / weights.sum())
                       for k in ("m", "sqrt_v", "update", "v_zero_m_nonzero", "frozen")}
                rows.append(dict(step=step, code=name, loss=float(loss), params=int(m.numel()), **agg))
                print(f"step {step:4d} loss {float(loss):.3f}  {name:45s} m {agg['m']:.4f}  sqrt(v) "
                      f"{agg['sqrt_v']:.4f}  update {agg['update']:.4f}  v=0<m {agg['v_zero_m_nonzero']:.1e}  "
                      f"frozen {agg['frozen']:.1e}")
    doc = {"what": "relative RMS quantisation error of AdamW moments (per tensor, weighted by size)",
           "model": "TinyLM: 2 pre-norm transformer layers, dim 128, vocab 512, seq 64, batch 16",
           "optimizer": "torch.optim.AdamW lr 1e-3 betas (0.9, 0.95) wd 0.1", "rows": rows,
           "torch": torch.__version__, "also_fused_source": source_digest()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
