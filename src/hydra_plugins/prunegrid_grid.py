"""Registers prunegrid's OmegaConf resolvers (``grid_prunes``, ``grid_references``, ``grid_baseline``,
``reference_name``) in every Hydra process.

Hydra imports every module of the ``hydra_plugins`` namespace when it starts, and DVC does
the same (``plugins_path`` in ``.dvc/config``) before composing ``params.yaml`` for
``dvc exp run``; so ``grid.prunes: all`` in ``conf/grid.yaml`` resolves there too.
"""

import prunegrid.resolvers  # noqa: F401  (registers the resolvers on import)
