"""A /metrics body read the way Prometheus reads it (prometheus_client's own parser), with the checks every
scrape must pass: histogram buckets that never decrease, and a +Inf bucket equal to the count."""

import math
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    def __init__(self, body: str):
        self.families = {family.name: family for family in text_string_to_metric_families(body)}
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.families.values()
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 for a counter series that has not appeared yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}

    def check_histograms(self) -> int:
        """Every histogram series is well formed; returns how many series were checked."""
        series: dict[tuple[str, frozenset], list[tuple[float, float]]] = defaultdict(list)
        for family in self.families.values():
            if family.type != "histogram":
                continue
            for sample in family.samples:
                if sample.name == f"{family.name}_bucket":
                    rest = frozenset((k, v) for k, v in sample.labels.items() if k != "le")
                    series[(family.name, rest)].append((float(sample.labels["le"]), sample.value))
        for (name, labels), buckets in series.items():
            buckets.sort()
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), f"{name}{dict(labels)}: buckets decrease: {buckets}"
            assert buckets[-1][0] == math.inf, f"{name}{dict(labels)} has no +Inf bucket"
            assert buckets[-1][1] == self.samples[(f"{name}_count", labels)], f"{name}{dict(labels)}: +Inf != count"
        return len(series)
