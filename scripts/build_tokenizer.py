"""Rebuild the bundled tokenizer (src/diffutron/assets/tokenizer/) from the bundled train split.

python scripts/build_tokenizer.py [--vocab-size 16384]
"""

import argparse

from diffutron.data.bundled import bundled_documents
from diffutron.tokenizer import bundled_tokenizer_path, train_tokenizer

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--vocab-size", type=int, default=16384)
args = parser.parse_args()
train_tokenizer((d.text for d in bundled_documents("train")), args.vocab_size, bundled_tokenizer_path(), overwrite=True)
print(f"wrote {bundled_tokenizer_path()}")
