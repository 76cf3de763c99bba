"""`--plot PATH`: time and memory against sequence length, one line per method (matplotlib)."""

from __future__ import annotations


def plot_scaling(rows: list[dict], path: str) -> bool:
    """Plot every (cell, B, D, H) family measured at two or more lengths T; False if there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {}
    for r in rows:
        families.setdefault((r["cell"], r["B"], r["D"], r["H"]), {}).setdefault(r["method"], []).append(r)
    families = {k: v for k, v in families.items() if len({r["T"] for rs in v.values() for r in rs}) >= 2}
    if not families:
        return False
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 4 * len(families)), squeeze=False)
    for (time_ax, mem_ax), ((cell, B, D, H), methods) in zip(axes, families.items()):
        for method, rs in methods.items():
            rs = sorted(rs, key=lambda r: r["T"])
            Ts = [r["T"] for r in rs]
            time_ax.plot(Ts, [r["time_ms"] for r in rs], marker="o", label=method)
            mem_ax.plot(Ts, [(r["temp_bytes"] or 0) / 2**20 for r in rs], marker="o", label=method)
        for ax, label in ((time_ax, "time per call (ms)"), (mem_ax, "XLA temp memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_title(f"{cell}, B={B}, D={D}, H={H}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
