"""The data layer: NIfTI I/O, dataset layout and checks, normalisation, caching, slices and volumes,
tumour size bins, synthetic phantoms and the BrainMetShare preparation.

Import the submodules directly (``from medgen_cli.data import nifti``); this package imports nothing
itself so that the CLI's start-up path stays free of numpy-heavy and torch imports. Only
``datasets`` imports torch.
"""
