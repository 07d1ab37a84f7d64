"""One module per ``medmae-jax`` command: ``HELP``, ``add_arguments(parser)``, ``run(args, overrides) -> int``.

Modules import their heavy dependencies inside ``run`` so ``medmae-jax --help`` stays fast.
"""

COMMANDS = ("train", "evaluate", "predict", "reconstruct", "demo", "benchmark", "convert", "build", "launch",
            "gradients")
