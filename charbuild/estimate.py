"""Estimates of what building a target costs (dependency-free: the null plan imports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Estimate:
    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0
    gpu_hours: float = 0.0
    calls: int = 0
    calibrated: bool = False  # from measured usage rather than the spec's expectations
    # The range of output tokens (and dollars) from the measured length distribution.
    tokens_out_p50: int = 0
    tokens_out_p90: int = 0
    usd_p90: float = 0.0

    def __add__(self, o: "Estimate") -> "Estimate":
        return Estimate(self.tokens_in + o.tokens_in, self.tokens_out + o.tokens_out, self.usd + o.usd,
                        self.gpu_hours + o.gpu_hours, self.calls + o.calls, self.calibrated and o.calibrated,
                        self.tokens_out_p50 + o.tokens_out_p50, self.tokens_out_p90 + o.tokens_out_p90,
                        self.usd_p90 + o.usd_p90)

    def scaled(self, f: float) -> "Estimate":
        return Estimate(int(self.tokens_in * f), int(self.tokens_out * f), self.usd * f, self.gpu_hours * f,
                        int(round(self.calls * f)), self.calibrated, int(self.tokens_out_p50 * f),
                        int(self.tokens_out_p90 * f), self.usd_p90 * f)

    def to_dict(self) -> dict:
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "usd": round(self.usd, 4),
                "gpu_hours": round(self.gpu_hours, 4), "calls": self.calls}
