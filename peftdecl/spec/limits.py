"""Bounds on every spec input, so a hostile or mistyped spec fails fast with a SpecError instead of exhausting
time or memory. Each bound is far above any real adapter and far below what breaks NumPy, torch or msgspec.

Resource limits (checked while reading, before the schema):

- ``MAX_DOCUMENT_BYTES``: a spec file, text or bytes is at most 1 MiB (PEFT's configs are ~2 KiB; AdaLoRA's
  rank masks of a large model reach a few hundred KiB); YAML text at most ``MAX_YAML_CHARS`` 256 Ki characters
  (YAML is for hand-written specs and parses far slower than JSON).
- ``MAX_DEPTH``: values nest at most 32 levels (the deepest real field, ``layer_replication``, uses 3).
- ``MAX_NODES``: at most 100,000 values in a spec after YAML aliases are expanded (a "billion laughs" document
  expands past this in microseconds of counting, before anything is built).
- ``MAX_STRING``: a string (value or key) is at most 65,536 characters.
- integers anywhere lie in [-2^63, 2^64 - 1] (msgspec's range); floats must be finite.

Field maxima (in the JSON Schemas too, so a schema validator agrees):

- ``MAX_RANK`` 65,536: LoRA/AdaLoRA/LoHa/LoKr/VeRA ``r`` and ``rank_pattern`` values, AdaLoRA ``init_r`` and
  ``target_r``, OFT ``r`` and ``oft_block_size``, BOFT ``boft_block_size`` and ``boft_block_num``, LoKr
  ``decompose_factor`` (a rank above the widest layer is refused at attach anyway).
- ``MAX_DIM`` 2^20: prompt ``token_dim``, ``encoder_hidden_size``, ``num_attention_heads``, ``num_layers``,
  ``num_virtual_tokens``, layer indices in ``layers_to_transform``, ``qalora_group_size``.
- ``MAX_PATTERNS`` 4,096: keys of ``rank_pattern`` / ``alpha_pattern`` (each is a regex compiled at load and
  tried on every targeted module).
- ``MAX_BUTTERFLY`` 32: BOFT ``boft_n_butterfly_factor`` (2^(n-1) must divide a layer's width, so 32 already needs
  a layer of 2^31 features).
- ``MAX_NEUMANN_TERMS`` 64: OFT ``num_cayley_neumann_terms`` (each term is one matrix product per block).
- ``MAX_STEPS`` 2^40: AdaLoRA ``total_step``, ``tinit``, ``tfinal``, ``deltaT`` (training steps).
- ``MAX_ALPHA`` 2^24: ``|lora_alpha|``, ``|alpha|`` and ``alpha_pattern`` values (integers are exact in float32
  up to 2^24; a larger scale only overflows half precision).
- ``MAX_FINITE``: every other float is finite (|x| ≤ the largest float64); NaN and ±infinity are refused.
- VeRA ``projection_prng_key`` lies in [-2^63, 2^63 - 1] (int64; torch's seeds).
"""

from __future__ import annotations

import os
import sys

from peftdecl.errors import PeftdeclError

MAX_DOCUMENT_BYTES = 1 << 20
MAX_YAML_CHARS = 256 << 10
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_STRING = 65_536
MIN_INT = -(1 << 63)
MAX_INT = (1 << 64) - 1
MAX_INT64 = (1 << 63) - 1

MAX_RANK = 65_536
MAX_PATTERNS = 4096
MAX_DIM = 1 << 20
MAX_BUTTERFLY = 32
MAX_NEUMANN_TERMS = 64
MAX_STEPS = 1 << 40
MAX_ALPHA = float(1 << 24)
MAX_FINITE = sys.float_info.max

ADAPTER_BYTES_ENV = "PEFTDECL_MAX_ADAPTER_BYTES"
DEFAULT_MAX_ADAPTER_BYTES = 16 << 30
"""An adapter whose float64 reference copy (parameter count × 8 bytes) exceeds this is refused before any array
is allocated: 16 GiB by default, about two billion parameters; set ``PEFTDECL_MAX_ADAPTER_BYTES`` (bytes) to change."""


def max_adapter_bytes() -> int:
    """The adapter-size limit in bytes: ``$PEFTDECL_MAX_ADAPTER_BYTES`` if set to a positive integer, else 16 GiB."""
    raw = os.environ.get(ADAPTER_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ADAPTER_BYTES
    if not raw.isdigit() or len(raw) > 30 or int(raw) == 0:
        raise PeftdeclError(f"{ADAPTER_BYTES_ENV}={raw[:40]!r}: expected a positive number of bytes")
    return int(raw)
