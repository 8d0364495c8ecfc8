"""merge_diagnostics.png: what each round's merge did (federation.merge_diagnostics; the numbers are fednano.diagnostics')."""

from __future__ import annotations

from pathlib import Path


def diagnostic_series(results: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per panel, per line: (round, value) from results.json's rounds that carry `merge_diagnostics`."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def add(panel: str, line: str, rnd: int, value: float | None) -> None:
        if value is not None:
            out.setdefault(panel, {}).setdefault(line, []).append((rnd, value))

    for r in results.get("rounds", []):
        d, rnd = r.get("merge_diagnostics"), r["round"]
        if not d:
            continue
        for pid, c in sorted(d["clients"].items()):
            add("weight share", f"client {pid}", rnd, c["weight_share"])
            add("Fisher total", f"client {pid}", rnd, c["fisher_total"])
            add("cosine to merged update", f"client {pid}", rnd, c["cosine_to_merged"])
            add("Fisher rel. error (vs 4x samples)", f"client {pid}", rnd, c.get("fisher_rel_error"))
        for name, t in sorted(d["tensors"].items()):
            add("effective clients per entry", name, rnd, t["effective_clients"])
            add("entries one client holds >= 90 %", name, rnd, t["dominated"])
        for name, v in sorted(d["factor_mismatch"].items()):
            add("factor mismatch |BA - mean(B_k A_k)| / |mean|", name, rnd, v)
        add("merged vs FedAvg update", "distance to FedAvg / FedAvg step", rnd, d["distance_to_average"])
        add("merged vs FedAvg update", "merged step / FedAvg step", rnd,
            d["merged_update_norm"] / d["average_update_norm"] if d["average_update_norm"] > 0 else None)
    return out


def plot_merge_diagnostics(results: dict, path: Path) -> None:
    """One panel per diagnostic, rounds on the x axis, a line per client or tensor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = diagnostic_series(results)
    if not series:
        return
    cols = 3
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), dpi=110, squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, series.items(), strict=False):
        for line, pts in lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=line)
        if panel == "Fisher total":
            ax.set_yscale("log")
        ax.set(title=panel, xlabel="round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fed = results["config"]["federation"]
    fig.suptitle(f"merge diagnostics · {fed['strategy']} · seed {fed['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
