"""A guarded host VLM, streamed: the pre-check runs while the host generates, and text is released
only after a check of the answer so far has passed.

    python examples/guarded_stream.py [IMAGE1 IMAGE2]

Guard: $VISGUARD_EXAMPLE_GUARD (default Tuwhy/Qwen2-VL-7B-MIRage). Host: $VISGUARD_EXAMPLE_HOST, a
local transformers VLM (default Qwen/Qwen2-VL-2B-Instruct) or an OpenAI-compatible base URL
(http://...; then $VISGUARD_EXAMPLE_HOST_MODEL names the served model).
"""

import os
import sys
from pathlib import Path

from visguard import Guard, Policy

images = sys.argv[1:3] or [str(Path(__file__).parent / "images" / n) for n in ("knife.png", "wine_glass.png")]
guard = Guard.from_pretrained(os.environ.get("VISGUARD_EXAMPLE_GUARD", "Tuwhy/Qwen2-VL-7B-MIRage"),
                              policy=Policy(timeout_s=60))
host = os.environ.get("VISGUARD_EXAMPLE_HOST", "Qwen/Qwen2-VL-2B-Instruct")
host_options = ({"model": os.environ.get("VISGUARD_EXAMPLE_HOST_MODEL", "")} if host.startswith("http")
                else {"max_new_tokens": 64})

with guard.wrap(host, pre_check="parallel", stream_check_every=8, host_options=host_options) as guarded:
    stream = guarded.stream(images, "Describe the two pictures in one sentence.")
    for piece in stream:  # pieces arrive only after the pre-check and a post-check of the text so far
        print(piece, end="", flush=True)
    result = stream.result
print()
print(f"blocked={result.blocked} reason={result.reason} stage={result.stage} "
      f"post-checks={result.output_checks}")
print(f"pre-check {result.input_verdict.label} P(unsafe)={result.input_verdict.score:.3f}; "
      f"timings {result.timings.model_dump()}")
