"""Tokenize JSONL or plain-text files into a Megatron-style indexed dataset (PREFIX.bin/.idx).

    megamoe-preprocess --input data/*.jsonl --output-prefix data/my \
        --tokenizer tok/my.model --workers 8

Each JSONL line is one document (its --json-key field); each plain-text file is one
document. EOS is appended to every document. For fine-tuning, --prompt-key names a prompt
field: the document is prompt + completion + EOS, and only the completion and EOS are targets
(PREFIX.lossmask.bin/.idx); --messages-key reads chat conversations, whose assistant turns
are the targets. Malformed lines, empty documents and
non-UTF-8 bytes are skipped and summarised by file:line, or are an error with --strict.
"""

import argparse
import logging
import sys

from ..data.prepare import preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl/.json files (JSON lines) or plain-text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model or tokenizer.json")
    parser.add_argument("--json-key", default="text", help="field of each JSONL object holding text")
    parser.add_argument("--prompt-key", default=None,
                        help="fine-tuning data: field holding a prompt that is context, not a target; "
                             "each document is prompt + --json-key field (e.g. completion) + EOS, and "
                             "PREFIX.lossmask.bin/.idx marks the targets")
    parser.add_argument("--messages-key", default=None,
                        help="fine-tuning data: field holding a chat ([{role, content}, ...]), "
                             "rendered in the Tulu / OLMoE-Instruct format; assistant turns are "
                             "the targets (PREFIX.lossmask.bin/.idx)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad line instead of skipping it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.bin/.idx")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (always none when stderr is not a terminal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = preprocess(args.input, args.output_prefix, args.tokenizer,
                            json_key=args.json_key, workers=args.workers, strict=args.strict,
                            overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty(),
                            prompt_key=args.prompt_key, messages_key=args.messages_key)
    except (ValueError, OSError) as e:  # bad input, existing output, missing file
        print(f"megamoe-preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report.documents} documents, {report.tokens} tokens to "
          f"{args.output_prefix}.bin/.idx")
    if args.prompt_key or args.messages_key:
        print(f"wrote the loss mask ({report.targets} target tokens) to "
              f"{args.output_prefix}.lossmask.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
