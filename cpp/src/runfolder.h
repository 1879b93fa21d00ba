// Run folders, as nn_numba/train.py writes them: OUT/<timestamp>/ holding config.toml, metrics.jsonl,
// best.ck and last.ck, and OUT/latest pointing at the newest run. Every file is written atomically.
#pragma once
#include <cstddef>
#include <string>

// OUT/<YYYYmmdd-HHMMSS>[-n]/, created now (with OUT) so an unwritable folder fails before any training.
std::string new_run_dir(const std::string& out);
// OUT/latest -> run (a relative symlink swapped in atomically; a text file naming the run where links
// fail). A convenience only: never fails.
void point_latest(const std::string& run);
// Temp file + fsync + rename + fsync of the folder: PATH is always either the old or the new text.
void write_text_atomic(const std::string& path, const std::string& text);
// Fails before training, not after an hour, when best.ck + last.ck (+ a save's temp copy) cannot fit.
void check_space(const std::string& folder, size_t n_params, int slots);
// --resume ARG: a run folder (then its last.ck) or a checkpoint file; the checkpoint, and its run folder
// with links resolved (OUT/latest is one).
std::string resume_checkpoint(const std::string& arg);
std::string resume_run_dir(const std::string& arg);
std::string folder_of(const std::string& path);
