"""Build matrices: many `pipeline build`s (models x targets x options) run as independent jobs, one after
another, in local processes, or as Ray tasks, with one summary at the end."""
