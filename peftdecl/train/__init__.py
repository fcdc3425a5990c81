"""``peftdecl train``: fine-tune a local model from one declarative training file.

The backend-neutral parts live here: the training file's Structs and schema (:mod:`.config`), data reading,
tokenising and batching (:mod:`.data`, :mod:`.batching`), learning-rate schedules (:mod:`.schedules`),
checkpoints (:mod:`.checkpoint`), progress, logs and plots (:mod:`.progress`) and the loop (:mod:`.loop`).
Each backend supplies a :class:`peftdecl.train.runtime.TrainingRuntime` for the framework-specific step.
"""
