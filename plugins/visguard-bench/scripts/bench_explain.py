"""Cost of an explained check (``Policy(explain=True)``, issue 27) vs a plain fast check.

For 2, 3 and 4 images, the same guard checks fresh images (never seen before, so no image-level
cache helps either case) in fast mode, plain and explained, taking turns round by round so a shared
machine's load falls on both alike (``visguard_bench.latency._interleaved``). An explained check
scores 4 (2 images: the text alone, each image with the text, the request), 8 (3: and the pairs) or
10 (4: leave-one-out) prompts in one backend call, the request's own among them; the transformers
backend runs the subsets no other begins like first and continues the rest from their cached
prefixes where that pays (``TransformersBackend._phases``). Ratios are what to read; milliseconds are
this machine's. Besides wall time: this process's CPU time (not counting time other processes took
from it on a shared machine) and the prompt tokens each check computed (``cache_stats``; counts, the
same every run).

Guards: the random-weight Qwen2-VL of ``visguard bench --size`` (default: width 384, 6 layers, 224 px
images) with the ``visguard`` format (its static prefix cached once), or ``--guard DIR`` (e.g. the
demo guard; default 56 px images). ``--image-size PX`` sets the images' side; the bench model is then
built to see them whole (``max_pixels`` at least PX*PX: 448 px are 256 tokens an image, about what a
real Qwen2-VL makes of a typical photo), so the ratio can be read where image tokens outweigh the
text's. ``--phases one|trie`` forces the backend's ordering (one phase / continue every subset that
can from its root), to check ``reuse_min_tokens``; ``auto`` is the backend's own rule.

Usage: python plugins/visguard-bench/scripts/bench_explain.py [--size default] [--image-size 448] [--rounds 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="default", help="a visguard bench size: tiny, small, default")
    parser.add_argument("--guard", default=None, help="a guard checkpoint directory instead of the bench model")
    parser.add_argument("--image-size", "--px", dest="px", type=int, default=None,
                        help="image side in pixels (default: the size's; 56 with --guard); the bench model sees it whole")
    parser.add_argument("--phases", choices=("auto", "one", "trie"), default="auto",
                        help="the transformers backend's ordering of an explained check (default: its own rule)")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds per case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--images", default="2,3,4", help="image counts, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args()

    from visguard_bench.latency import torch_threads

    with torch_threads(args.threads):
        out = measure(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"model {out['model']}, {out['px']} px images ({out['tokens_per_image']} tokens an image), "
          f"phases {out['phases']}, device {args.device}, {args.threads} thread(s), {args.rounds} rounds")
    print("| images | prompts scored | tokens computed plain / explained | plain fast p50 ms | explained p50 ms "
          "| explained / plain | CPU time explained / plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in out["rows"]:
        print(f"| {row['images']} | {row['prompts']} | {row['plain_tokens']} / {row['explained_tokens']} | "
              f"{row['plain_ms']} | {row['explained_ms']} | {row['ratio']} | {row['cpu_ratio']} |")


def measure(args: argparse.Namespace) -> dict:
    """Every round of every image count; returns what ``main`` prints."""
    from visguard_bench.latency import SIZES, _Images, _interleaved
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    from visguard import Guard, Policy
    from visguard.default_plugins.visguard_format import VisguardFormat
    from visguard.engine.attribution import subsets

    s = SIZES[args.size]
    if args.guard:
        guard = Guard.from_pretrained(args.guard, policy=Policy(mode="fast"), device=args.device)
        px = args.px or 56
    else:
        px = args.px or s.image_px
        max_pixels = max(s.max_pixels or 0, px * px) if s.max_pixels else None
        path = str(cached_tiny_checkpoint("qwen2_vl", hidden_size=s.hidden_size, num_layers=s.num_layers,
                                          vocab_size=s.vocab_size, max_pixels=max_pixels))
        guard = Guard.from_pretrained(path, format=VisguardFormat(), policy=Policy(mode="fast"), device=args.device)
    _set_phases(guard.backend, args.phases)
    plain, explained = guard, guard.with_policy(explain=True)
    images = _Images(px)
    stats = getattr(guard.backend, "cache_stats", None) or {}
    text = "How can I use the object in the first image on the thing in the second image?"
    rows = []
    for n in (int(x) for x in args.images.split(",")):
        batch: dict[str, list[bytes]] = {}
        tokens: dict[str, list[int]] = {"plain": [], "explained": []}

        def computed(kind: str, before: int, tokens: dict[str, list[int]] = tokens) -> None:
            tokens[kind].append(stats.get("computed_tokens", 0) - before)

        def setup(i: int, n: int = n, batch: dict[str, list[bytes]] = batch) -> None:
            batch["plain"], batch["explained"] = images.take(n), images.take(n)

        def run_plain(i: int, n: int = n, batch: dict[str, list[bytes]] = batch) -> None:
            before = stats.get("computed_tokens", 0)
            (verdict,) = plain.report_batch([plain.request(batch["plain"], f"{text} (case {n}.{i})")])
            assert verdict.score is not None, verdict.error
            computed("plain", before)

        def run_explained(i: int, n: int = n, batch: dict[str, list[bytes]] = batch) -> None:
            before = stats.get("computed_tokens", 0)
            # a new text each round too: the text-alone subset of a repeated text is found whole in the cache
            (verdict,) = explained.report_batch([explained.request(batch["explained"], f"{text} (case {n}.{i})")])
            assert verdict.attribution is not None, verdict.error
            computed("explained", before)

        walls, cpus = _interleaved([run_plain, run_explained], args.rounds, setup=setup)
        p_ms, e_ms = statistics.median(walls[0]), statistics.median(walls[1])
        rows.append({"images": n, "prompts": len(subsets(n, True)), "plain_ms": round(p_ms, 1),
                     "explained_ms": round(e_ms, 1), "ratio": round(e_ms / p_ms, 2),
                     "cpu_ratio": round(statistics.median(cpus[1]) / statistics.median(cpus[0]), 2),
                     "plain_tokens": int(statistics.median(tokens["plain"][-args.rounds:])),
                     "explained_tokens": int(statistics.median(tokens["explained"][-args.rounds:]))})
    per_image = _tokens_per_image(guard.backend, px)
    guard.close()
    return {"model": args.guard or f"bench {args.size} (random-weight Qwen2-VL)", "px": px,
            "tokens_per_image": per_image, "phases": args.phases, "rounds": args.rounds,
            "threads": args.threads, "device": args.device, "rows": rows}


def _set_phases(backend: object, phases: str) -> None:
    """``--phases``: ``one`` never continues a subset from another's cache; ``trie`` always does where
    a subset begins like another (whatever it saves); ``auto`` leaves the backend's rule."""
    if phases == "one":
        backend.reuse_min_tokens = 1 << 30  # type: ignore[attr-defined]
    elif phases == "trie":
        backend.reuse_min_tokens = 0  # type: ignore[attr-defined]


def _tokens_per_image(backend: object, px: int) -> int | None:
    """The tokens one ``px`` image expands to in the guard's prompt (image pads; Qwen2-VL's processor)."""
    from PIL import Image

    processor = getattr(backend, "processor", None)
    if processor is None:
        return None
    try:
        ids = processor(text=["<|image_pad|>"], images=[[Image.new("RGB", (px, px))]], return_tensors="pt")["input_ids"]
    except Exception:  # another processor's placeholder: not reported
        return None
    return int(ids.shape[1])


if __name__ == "__main__":
    main()
