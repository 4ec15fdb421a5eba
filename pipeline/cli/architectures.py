"""`pipeline architectures`: the model families the pipeline builds, with their tasks and targets."""

from __future__ import annotations

from typing import Optional

import click


@click.command()
@click.option("--model", type=str, help="Check one model folder (or GGUF file): its family and task, or why not.")
def architectures(model: Optional[str]) -> None:
    """List each model family (config model_type) with its tasks and targets.

    \b
    Examples:
      pipeline architectures
      pipeline architectures --model ./my-ner-model
    """
    from pipeline.build.plan import targets_of
    from pipeline.models.registry import ARCHITECTURES, inspect_model

    if model:
        info = inspect_model(model, None)  # an unsupported model_type: one line naming it and the supported list
        pooling = f", {info.sentence_modules.describe()}" if info.sentence_modules else ""
        click.echo(f"{info.path}: {info.architecture.model_type} ({info.architecture.family}), "
                   f"task {info.task.name}{pooling}; targets: {', '.join(targets_of(info.architecture.family))}")
        return
    width = max(len(name) for name in ARCHITECTURES)
    for name, arch in sorted(ARCHITECTURES.items(), key=lambda item: (item[1].family != "encoder", item[0])):
        shared = f" (code of {arch.shares_code_with})" if arch.shares_code_with else ""
        click.echo(f"{name:<{width}}  {arch.family:<7}  tasks: {', '.join(arch.tasks)}; "
                   f"targets: {', '.join(targets_of(arch.family))}{shared}")
