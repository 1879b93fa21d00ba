// Just enough JSON for META sections and --json output: a strict validator
// (the Python reader json.loads META, so C++ must reject the same payloads) and writers.
#pragma once
#include <string>

// True if `text` is valid UTF-8 holding exactly one strict (RFC 8259) JSON object:
// no NaN/Infinity, as docs/checkpoint-format.md requires. On failure `why` says where.
bool json_object_valid(const std::string& text, std::string* why);
// "quoted and escaped"
std::string json_str(const std::string& s);
// A JSON number, null if not finite. digits = 0: the shortest text that reads back as the
// same double (0.9816, not 0.98160000000000003); else printf's %.<digits>g.
std::string json_num(double x, int digits = 0);
// The shortest text that reads back as the same float (logits, probabilities).
std::string json_num(float x);
