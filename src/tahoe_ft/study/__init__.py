"""The study: the case study's rounds run as one job, over folds and seeds, and compared.

Owns `reproduce` (`tahoe-ft reproduce`: every round trained, predicted and scored in order), `folds`
(perturbations dealt into K folds, one split TOML each) and `comparison` (`compare`: one table and plots of
every run beside the baseline panel and the ceiling; `compare_splits`: mean ± sd over folds and seeds, and each
round's verdict against each baseline).
"""
