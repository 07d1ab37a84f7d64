"""What a weight conversion placed, left over and missed, by name."""

from __future__ import annotations

import dataclasses

from medmae_jax.errors import ConversionError


@dataclasses.dataclass
class ConversionReport:
    """Keys of the source not placed (``unused``), and model parameters not filled (``missing``)."""

    layout: str
    unused: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # known-unused keys (e.g. MONAI cross_attn)

    @property
    def clean(self) -> bool:
        return not self.unused and not self.missing

    def check(self, strict: bool) -> "ConversionReport":
        """Raise under ``strict`` when anything was left over or missing."""
        if strict and not self.clean:
            raise ConversionError(f"{self.layout}: strict conversion failed\n{self}")
        return self

    def __str__(self) -> str:
        lines = [f"layout: {self.layout}"]
        for name, keys in (("unused source keys", self.unused), ("missing model parameters", self.missing),
                           ("ignored (known unused) keys", self.ignored)):
            if keys:
                lines.append(f"{name} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        if self.clean:
            lines.append("every key placed, every parameter filled")
        return "\n".join(lines)
