"""``sparsequant generate``: stream text from a checkpoint or any model through the decode engine."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers, common_parent):
    p = subparsers.add_parser(
        "generate", parents=[common_parent], help="generate text (static KV cache, CUDA-graph decode, streaming)",
        description="Generate a continuation of each prompt with the sparsequant decode engine. One prompt is "
        "streamed to the terminal token by token; several are generated as one left-padded batch.",
        epilog='example: sparsequant generate runs/smollm2-24-w4 --prompt "The capital of France is"',
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, model folder, .gguf or hub id; omitted: the bundled default model")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on a GPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for CUDA when it works, off on the CPU)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="stack each layer's q/k/v and gate/up linears into one linear each (default; "
                   "--no-fuse keeps them separate; checkpoints are never changed)")
    p.add_argument("--embed-int8", action="store_true",
                   help="hold the input embedding as int8 rows + one scale per row (half its bytes; "
                   "refused when the LM head is tied to it)")
    p.add_argument("--head-int8", action="store_true",
                   help="hold the LM head as int8 rows + one scale per row (half the bytes of a decode step's "
                   "largest read; a W8A16 kernel on CUDA)")
    p.set_defaults(func=run)
    return p


class TextStream:
    """Prints the new text of one sequence as tokens arrive. It decodes prompt + continuation each
    time and prints what is new, so word-initial spaces and multi-token characters come out right."""

    def __init__(self, tokenizer, prompt_ids: list[int], out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids = list(prompt_ids)
        self.base = tokenizer.decode(self.ids, skip_special_tokens=True)
        self.shown = ""  # continuation printed so far

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)[len(self.base):]

    def __call__(self, step, tokens):
        if tokens[0] is None:
            return
        self.ids.append(tokens[0])
        text = self.text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def run(args) -> int:
    import torch

    from ..errors import SparseQuantError
    from ..models.loading import is_checkpoint, load_model
    from ..runtime.generate import generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and is_checkpoint(args.model):
        from .. import api

        model, tokenizer = api.load(args.model, device=device, embed_int8=args.embed_int8, fuse=args.fuse,
                                    head_int8=args.head_int8)
    else:
        dtype = torch.float32 if device == "cpu" else torch.float16
        model, tokenizer = load_model(args.model, dtype=dtype, device=device, quiet=args.quiet)
        if args.head_int8:
            from ..nn.int8_linear import quantize_lm_head

            quantize_lm_head(model, dtype)
        if args.embed_int8:
            from ..nn.embedding import quantize_input_embedding

            quantize_input_embedding(model, dtype)
        if args.fuse:
            from ..models.fused import fuse_projections

            fuse_projections(model)
    if tokenizer is None:
        raise SparseQuantError(f"{args.model} has no tokenizer files; text prompts need one")
    prompts = args.prompt
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    stream = TextStream(tokenizer, tokenizer(prompts[0])["input_ids"]) if len(prompts) == 1 else None
    if stream is not None:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    out = generate(model, prompts, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=stream,
                   cuda_graph=False if args.no_cuda_graph else None, compile=args.compile)
    if stream is not None:
        sys.stdout.write(stream.text()[len(stream.shown):] + "\n")
    else:
        for prompt, text in zip(args.prompt, out.texts):
            print(f"--- {prompt}\n{prompt}{text}\n")
    return 0
