"""The names of the files the core writes: one place, imported by the core modules that
write them and by ``steps.artifacts`` (the artifact contract), without pulling in models."""

# model bundle (recontrast_core.bundle)
BUNDLE_WEIGHTS_FILE = "model.safetensors"
BUNDLE_META_FILE = "bundle.json"
# model.kind auto / fused keep the ReContrast candidate's bundle here, beside bundle/
# (recontrast_core.fit); it is never the train step's output bundle
CANDIDATES_DIR = "candidates"
# adapted encoder (recontrast_core.adapt)
ENCODER_FILE = "encoder.safetensors"
ENCODER_META_FILE = "encoder.json"
# evaluation (recontrast_core.evaluate)
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
# prediction (recontrast_core.predict)
RESULTS_FILE = "results.csv"
# every step's output folder: "running" while the step writes, "complete" when it finished
# (recontrast_core.runtime.step_outputs); the next step refuses a folder not complete
STEP_MARKER_FILE = ".recontrast-step.json"
