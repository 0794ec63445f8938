"""choline monitor service: Tails metrics, runs detectors, asks an LLM to explain bad runs; owns findings."""
