"""Train a byte-fallback sentencepiece tokenizer on text or JSONL files.

    megamoe-tokenizer --input data/*.jsonl --model-prefix tok/my --vocab-size 32000
"""

import argparse
import sys

from ..data.tokenizer import load_tokenizer, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl files (one JSON object per line) or plain-text files")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--json-key", default="text", help="field of each JSONL object holding text")
    parser.add_argument("--input-sentence-size", type=int, default=300_000,
                        help="lines sampled for training (more is slower, rarely better)")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.model/.vocab")
    args = parser.parse_args(argv)
    try:
        path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size,
                                   json_key=args.json_key,
                                   input_sentence_size=args.input_sentence_size,
                                   num_threads=args.threads, model_type=args.model_type,
                                   overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # too small a text for the vocabulary, a missing or existing file
        print(f"megamoe-tokenizer: error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(path)
    print(f"wrote {path}: vocab {tokenizer.vocab_size}, eos {tokenizer.eos_id}, "
          f"pad {tokenizer.pad_id}, bos {tokenizer.bos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
