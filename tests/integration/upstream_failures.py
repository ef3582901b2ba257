"""Known failures of transformers itself, by model type and transformers version.

A tiny model of these types fails in transformers' own code (not ours) with the installed
version. The catalogue test runs the model anyway and expects exactly the recorded error: it
reports the failure as an expected one (xfail) and fails as soon as a version in the range no
longer raises it, so that the entry gets removed (or its range narrowed) once upstream fixes it.
Other tests skip these types with the recorded reason instead of failing on upstream's bug.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class UpstreamFailure:
    model_type: str
    versions: str  # a PEP 440 specifier of the transformers versions that fail
    error: str  # "ExceptionType: start of the message", as raised by the model's forward
    where: str  # where in transformers it fails, and why

    def matches(self, exc: BaseException) -> bool:
        return f"{type(exc).__name__}: {exc}".startswith(self.error)

    def describe(self) -> str:
        return f"known transformers failure ({self.versions}): {self.error} -- {self.where}"


UPSTREAM_FAILURES = (
    UpstreamFailure(
        model_type="doge",
        versions="<5.18.0",  # seen with 5.17.0; 5.18.0 unpacks the tuple
        error="TypeError: dropout(): argument 'input' (position 1) must be Tensor, not tuple",
        where="DogeDecoderLayer.forward passes the (hidden_states, router_logits) tuple that DogeCDMoE "
              "returns to dropout without unpacking it",
    ),
    UpstreamFailure(
        model_type="llama4",
        versions=">=5.24.0",  # 5.17.0 and 5.23.0 run
        error="AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'",
        where="Llama4ForConditionalGeneration.forward reads image_outputs from its text model's output, "
              "which is a MoeCausalLMOutputWithPast without that field (modeling_llama4.py)",
    ),
)


def known_upstream_failure(model_type: str, version: str | None = None) -> UpstreamFailure | None:
    """The entry for ``model_type`` whose range holds ``version`` (default: the installed transformers)."""
    if version is None:
        import transformers

        version = transformers.__version__
    for entry in UPSTREAM_FAILURES:
        if entry.model_type == model_type and Version(version) in SpecifierSet(entry.versions):
            return entry
    return None
