"""Evaluation: the compared families, the selection runs, the report and its plots, benchmarks, the main job."""
