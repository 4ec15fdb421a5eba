"""`pipeline generate`: stream a built decoder LLM's continuation of a prompt, with its speed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.core.errors import InputError


class TextStream:
    """Prints only the characters each new token adds (a multi-byte piece waits until it is whole)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            click.echo(text[len(self.printed):], nl=False)
            self.printed = text


def run_generation(build_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                   fp32: bool, threads: int, chat: bool) -> None:
    from transformers import AutoTokenizer

    from pipeline.models.decoding import KVDecoder, generate

    model = build_dir / ("model.fp32.onnx" if fp32 else "model.onnx")
    if not model.is_file() or not (build_dir / "tokenizer").is_dir():
        raise InputError(f"{build_dir} holds no finished LLM build ({model.name} and tokenizer/); run pipeline build first")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    from pipeline.build.readback import checked_file, checked_tree, load_manifest

    manifest = load_manifest(build_dir)  # a build directory is untrusted: its files must match the manifest
    checked_file(build_dir, manifest, model.name)
    tokenizer = AutoTokenizer.from_pretrained(str(checked_tree(build_dir, manifest, "tokenizer")),
                                              trust_remote_code=False)
    text = prompt
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    prompt_ids = tokenizer(text).input_ids
    with KVDecoder(model, threads) as decoder:
        click.echo(prompt, nl=False)
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        result = generate(decoder, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                          stop_ids=stop, on_token=TextStream(tokenizer))
    click.echo("")
    click.echo(f"[{model.name}: {len(prompt_ids)} prompt tokens in {result.prefill_s * 1000:.0f} ms; "
               f"{len(result.tokens)} new tokens, decode {result.decode_tokens_per_s:.1f} tokens/s]", err=True)
