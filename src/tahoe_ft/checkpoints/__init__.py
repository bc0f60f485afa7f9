"""Checkpoints: tahoe-ft's own files and upstream `state tx train` compatibility.

Owns `io` (atomic save, weights-only load, `init_from` with its report, `load_checkpoint`), `upstream_hparams`
(upstream `hyper_parameters` <-> tahoe-ft hparams), `upstream_folder` (`state tx train` run folders in, and
out with `export-state`) and `safe_pickle` (the restricted unpickler those folders' files are read with).
Nothing here trains or predicts.
"""
