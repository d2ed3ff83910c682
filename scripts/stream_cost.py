"""What a guarded stream's re-checks cost, in tokens the guard model computed: issue 26's table.

A host streams an answer of N sentences word by word (about 10 pieces and 12-15 guard tokens a
sentence) through ``guard.wrap`` on a tiny random-weight Qwen2-VL guard (``visguard_testing``,
built locally) on the transformers backend with its KV cache; the re-checks follow the guarded
stream's cadence (:class:`visguard.hosting.guarded.StreamCadence`). Reported per answer: the checks,
the tokens computed and reused (``backend.cache_stats``), and computed tokens per sentence, which
stays flat when the total grows linearly with the answer.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python scripts/stream_cost.py [--sentences 10 100 1000] [--kv-cache-mb 256]

``tests/test_stream_cost.py`` runs :func:`measure` and holds the growth to linear.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = (
    " The red box is on the left side of the table.",
    " Then put the tool in the red box and close it.",
    " Take the first picture and hold it to the light.",
)
QUESTION = "How do I use this on that?"


def answer_pieces(sentences: int) -> list[str]:
    """The host's answer as word pieces (each with its leading space)."""
    words = "".join(SENTENCES[i % len(SENTENCES)] for i in range(sentences)).split(" ")
    return [" " + w for w in words if w]


def measure(sentences: int, *, kv_cache_mb: float = 256, path: str | None = None, **options: Any) -> dict[str, Any]:
    """Stream an answer of ``sentences`` sentences through a guarded host; the post-checks' cost.

    ``options``: more :class:`~visguard.hosting.guarded.GuardedOptions` (the cadence). The
    pre-check is off, so only the answer's checks are counted.
    """
    import torch
    from PIL import Image

    from visguard import Guard
    from visguard.default_plugins.transformers_backend import TransformersBackend
    from visguard.default_plugins.visguard_format import VisguardFormat

    torch.set_num_threads(1)
    if path is None:
        from visguard_testing.checkpoints import cached_tiny_checkpoint

        path = str(cached_tiny_checkpoint("qwen2_vl"))
    backend = TransformersBackend(path, device="cpu", kv_cache_mb=kv_cache_mb)
    guard = Guard(backend, VisguardFormat())
    pieces = answer_pieces(sentences)
    # on_unsafe="return": a random-weight guard's verdicts must not end the stream early
    guarded = guard.wrap(lambda images, text: iter(pieces), pre_check="off", on_unsafe="return", **options)
    before = dict(backend.cache_stats)
    stream = guarded.stream([Image.new("RGB", (64, 64), (200, 30, 30))], QUESTION)
    text = "".join(stream)
    result = stream.result
    assert result is not None and text == "".join(pieces)
    computed = backend.cache_stats["computed_tokens"] - before["computed_tokens"]
    reused = backend.cache_stats["reused_tokens"] - before["reused_tokens"]
    return {
        "sentences": sentences,
        "pieces": len(pieces),
        "checks": result.output_checks,
        "computed": computed,
        "reused": reused,
        "per_sentence": computed / sentences,
        "kv_entries": len(backend.kv_cache) if backend.kv_cache is not None else 0,
        "kv_mb": (backend.kv_cache.nbytes if backend.kv_cache is not None else 0) / (1 << 20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--kv-cache-mb", type=float, nargs="+", default=[256])
    parser.add_argument("--min-pieces", type=int, default=None, help="stream_check_min_pieces (default: the option's)")
    args = parser.parse_args()
    options = {} if args.min_pieces is None else {"stream_check_min_pieces": args.min_pieces}
    print("| kv_cache_mb | sentences | pieces | checks | tokens computed | reused | computed per sentence | KV entries / MB |")
    print("|---|---|---|---|---|---|---|---|")
    for mb in args.kv_cache_mb:
        for n in args.sentences:
            r = measure(n, kv_cache_mb=mb, **options)
            print(f"| {mb:g} | {n:,} | {r['pieces']:,} | {r['checks']:,} | {r['computed']:,} | {r['reused']:,} | "
                  f"{r['per_sentence']:.1f} | {r['kv_entries']} / {r['kv_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
