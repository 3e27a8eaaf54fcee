"""The run's config sections: `seed`, `train`, `eval` and `predict` (lpt_jax.config.fields).

Nothing in `train`, `eval` or `predict` changes what a run computes (how long, how often, where
to write, what to evaluate), so a workdir resumes under other values of them.
"""

from lpt_jax.config.fields import (
                                   INCIDENTAL,
                                   LOCATION,
                                   SERVING,
                                   TRAINING,
                                   Field,
                                   Section,
                                   boolean,
                                   integer,
                                   one_of,
                                   text,
)

SEED = Field(0, "seed of the prompt init and of each phase's data order and augmentation "
             "(phase n: seed + 1000 n)", integer(), TRAINING)

TRAIN = Section("how the configured phases run", dict(
    phases=Field("1,2", "the phases to run, in order: their numbers ('1', '2', '1,2') or names",
                 text(), TRAINING),
    log_every_steps=Field(50, "steps between console lines and TensorBoard scalars",
                          integer(at_least=1), TRAINING),
    checkpoint_every_steps=Field(500, "steps between checkpoints (and one at each phase's end)",
                                 integer(at_least=1), TRAINING),
    keep_checkpoints=Field(3, "checkpoints kept per phase", integer(
        at_least=1, note="0 would keep no checkpoint to resume from"), TRAINING),
    max_steps=Field(0, "stop each phase after this many steps (smoke tests; 0: no limit)",
                    integer(at_least=0, note="0: no limit"), TRAINING),
    on_nonfinite=Field("stop", "a non-finite loss or gradient: 'stop' (the last checkpoint "
                       "holds the last good state) or 'skip' the update and count it",
                       one_of("stop", "skip"), TRAINING),
    stop_after_steps=Field(0, "save and stop this invocation after this many steps (0: run "
                           "to the end); rerunning continues", integer(
                               at_least=0, note="0: no limit"), TRAINING),
    num_devices=Field(0, "devices to use: the first n (0: all)",
                      integer(at_least=0, note="0: all devices"), INCIDENTAL),
    microbatches=Field(1, "gradient accumulation: each device's share of a stream's batch "
                       "in this many slices, run one after another and averaged (less memory; "
                       "the same update up to rounding and the slices' own random draws)",
                       integer(at_least=1), INCIDENTAL, TRAINING),
    start_export=Field("", "when the first configured phase starts from an earlier one "
                       "(phase 2 from phase 1): that phase's export.npz ('' = the workdir's)",
                       text(), LOCATION, TRAINING),
    allow_config_change=Field(False, "resume a workdir whose run had another config or "
                              "inputs", boolean(), TRAINING)), run_defining=False)

EVAL = Section("evaluation: validation during training and the final table", dict(
    batch_size=Field(256, "images per evaluation batch (all devices)", integer(at_least=1)),
    every_epochs=Field(0, "validation accuracy every this many epochs (0: only at the end of "
                       "a phase)", integer(at_least=0, note="0: only at the end of a phase")),
    final_split=Field("test", "the split of the final table (model selection never sees it)",
                      one_of("val", "test")),
    max_examples=Field(0, "evaluate a prefix of this many images (smoke tests; 0: the whole "
                       "split)", integer(at_least=0, note="0: the whole split")),
    plot=Field(True, "write per_class.png beside the table", boolean()),
    allow_other_class_names=Field(False, "evaluate or predict with an export trained on other "
                                  "classes or another class order", boolean()),
    # Test-time ensembling as in LIFT (Shi et al., ICML 2024): reported beside the single-view
    # accuracy, never instead of it; training is unchanged (no role: a workdir resumes).
    ensemble=Field("none", "also report the accuracy of the logits averaged over views of "
                   "each image: 'five_crop' (torchvision FiveCrop of the image resized to "
                   "data.image_size + eval.ensemble_expand on its shorter side) or 'ten_crop' "
                   "(those five and the five of the flipped image)",
                   one_of("none", "five_crop", "ten_crop")),
    ensemble_expand=Field(24, "pixels added to data.image_size for the shorter side that "
                          "eval.ensemble crops from (LIFT's 24)", integer(at_least=0))),
    run_defining=False)

PREDICT = Section("prediction: top-k labels of image files", dict(
    top_k=Field(5, "labels per image", integer(at_least=1), SERVING),
    batch_size=Field(64, "images per predict batch", integer(at_least=1), SERVING)),
    run_defining=False)
