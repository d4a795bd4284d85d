"""Input pipelines: seqio tasks, vocabularies, feature converters and data iterators.

The only package that imports TensorFlow, seqio and TFDS, and only in the submodules a caller
imports explicitly; importing `efficientlm.data` or `efficientlm.data.config` loads none of them.

  config.py              DatasetConfig (what to read; bound by the run gins)
  pipeline.py            get_iterator / get_eval_iterators: numpy batches for one process
  iterator.py            DataIterator with save/restore of its position
  tasks.py               the built-in tasks, registered on import (C4, PG19, synthetic, stdlib)
  feature_converters.py  task features -> model features ('enc_dec', 'decoder', 'prefix_lm')
  span_corruption.py     T5's span-corruption objective
  preprocessors.py       splitting token streams into LM / prefix-LM examples
  synthetic.py           associative recall (MQAR) and induction heads
  choices.py             tasks with answer choices -> [examples, choices, ...] batches (T-Few)
  stdlib_code.py         stdlib_code_lm: the Python standard library's source, byte by byte
  stdlib_next_line.py    stdlib_code_next_line: which of 4 lines comes next (answer choices)
  text_files.py          register_text_lm: the user's own .txt / .jsonl files
  vocabularies.py        default_vocabulary (gin) and cached SentencePiece models
  tfds_source.py         TFDS source whose missing-data error says how to prepare it
  registry.py            idempotent task registration
  tensorflow_cpu.py      imports TensorFlow with GPUs hidden from it
"""
