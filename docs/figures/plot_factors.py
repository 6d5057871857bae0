"""Plot the per-dimension rescale factors lambda_i of each RoPE extension method.

Writes docs/figures/factors.png (used by docs/math.md):

    python docs/figures/plot_factors.py [--out PATH]

Setting: head_dim 64, base 1e5, 8K -> 16K (s = 2): SmolLM2-135M's RoPE. Every curve
comes from a LongRoPEConfig constructor, so the figure shows what the library runs.
A searched LongRoPE factor file shipped in longrope_triton/factors/ for this setting,
if there is one, is drawn too.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path

HEAD_DIM, BASE, L_ORIG, L_TARGET = 64, 1e5, 8192, 16384
SHIPPED = "smollm2-135m-16k.json"


def method_configs():
    """(label, LongRoPEConfig, style) for each method, all for the same model and target."""
    from longrope_triton import LongRoPEConfig
    from longrope_triton.config import critical_dimension

    common = dict(head_dim=HEAD_DIM, original_max_position_embeddings=L_ORIG, max_position_embeddings=L_TARGET,
                  base=BASE)
    s = L_TARGET / L_ORIG
    d_cd = critical_dimension(HEAD_DIM, BASE, L_ORIG)
    n_upper = HEAD_DIM // 2 - d_cd
    # an illustrative searched set: in [s, 1.25 s] (the search range), non-decreasing from d_cd on
    upper = [s + 0.25 * s * (j / max(n_upper - 1, 1)) ** 2 for j in range(n_upper)]
    out = [
        ("PI", LongRoPEConfig.pi(**common), dict(color="tab:blue", ls="-")),
        ("NTK-aware", LongRoPEConfig.ntk(**common), dict(color="tab:orange", ls="-")),
        ("YaRN", LongRoPEConfig.yarn(**common), dict(color="tab:green", ls="-")),
        ("Llama-3.1", LongRoPEConfig.llama3(HEAD_DIM, L_ORIG, L_TARGET, base=BASE, factor=s),
         dict(color="tab:red", ls="-")),
        ("LongRoPE2 (illustrative upper set)", LongRoPEConfig.longrope2(upper_factors=upper, **common),
         dict(color="tab:purple", ls="--")),
    ]
    try:
        text = resources.files("longrope_triton").joinpath("factors", SHIPPED).read_text(encoding="utf-8")
        out.append((f"LongRoPE searched ({SHIPPED})", LongRoPEConfig.from_json(text),
                    dict(color="black", ls=":")))
    except (FileNotFoundError, OSError, ValueError, json.JSONDecodeError):
        pass
    return out, d_cd


def plot(out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, d_cd = method_configs()
    dims = list(range(HEAD_DIM // 2))
    theta = [BASE ** (-2 * i / HEAD_DIM) for i in dims]

    fig, (ax_l, ax_w) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for label, cfg, style in configs:
        lam = cfg.long_factor
        ax_l.plot(dims, lam, marker="o", ms=3, lw=1.6, label=label, **style)
        ax_w.plot(dims, [2 * math.pi * lam_i / t for lam_i, t in zip(lam, theta)], marker="o", ms=3, lw=1.4,
                  label=label, **style)
    ax_w.plot(dims, [2 * math.pi / t for t in theta], color="gray", lw=2.5, alpha=0.5, label="original RoPE (λ = 1)")

    for ax in (ax_l, ax_w):
        ax.axvline(d_cd, color="gray", ls=":", lw=1)
        ax.set_xlabel("frequency index i  (θ_i = base^(−2i/d), fast → slow)")
        ax.grid(alpha=0.3)
    ax_l.text(d_cd + 0.3, 1.03, f"critical dim d_cd = {d_cd}", color="gray", fontsize=8)
    ax_l.set_ylabel("rescale factor λ_i  (inv_freq_i = θ_i / λ_i)")
    ax_l.set_title("Long-regime factors λ_i")
    ax_l.set_ylim(0.9, None)
    ax_l.legend(fontsize=8, loc="upper left")

    ax_w.set_yscale("log")
    ax_w.axhline(L_ORIG, color="k", lw=0.8, ls="--")
    ax_w.axhline(L_TARGET, color="k", lw=0.8, ls="-.")
    ax_w.text(0.3, L_ORIG * 0.62, f"L_orig = {L_ORIG}", fontsize=8)
    ax_w.text(0.3, L_TARGET * 1.15, f"L_target = {L_TARGET}", fontsize=8)
    ax_w.set_ylabel("wavelength 2π λ_i / θ_i  (tokens)")
    ax_w.set_title("Period of each dimension after rescaling")
    ax_w.legend(fontsize=8, loc="upper left")

    fig.suptitle(f"head_dim {HEAD_DIM}, base {BASE:.0e}, {L_ORIG // 1024}K → {L_TARGET // 1024}K (s = "
                 f"{L_TARGET / L_ORIG:g})", fontsize=11)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("factors.png"))
    args = parser.parse_args(argv)
    plot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
