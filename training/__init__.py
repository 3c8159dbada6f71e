"""Training SESAME with DeepSpeed: flags (args), factories (build), DeepSpeed recipe and engine, the
resumable data stream, the loop, validation, checkpoints and resume, and the merge to the released layout."""
