#include "config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <sys/stat.h>

#include <toml++/toml.h>

#include "error.h"
#include "json.h"

namespace {

// ---------------------------------------------------------------- the keys, in nn_numba/config.py's order

enum class Kind { Int, Float, Bool, Str, List };
struct Key {
    const char* table;
    const char* name;
    Kind kind;
    void* (*at)(Config&);
};
#define KEY(t, k, kind, m) Key{t, k, Kind::kind, [](Config& c) -> void* { return &c.m; }}
const Key KEYS[] = {
    KEY("model", "sizes", List, sizes),
    KEY("data", "dir", Str, data_dir), KEY("data", "val_split", Float, val_split),
    KEY("data", "shuffle", Bool, shuffle),
    KEY("optim", "name", Str, optim), KEY("optim", "lr", Float, lr), KEY("optim", "momentum", Float, momentum),
    KEY("optim", "nesterov", Bool, nesterov), KEY("optim", "weight_decay", Float, weight_decay),
    KEY("optim", "beta1", Float, beta1), KEY("optim", "beta2", Float, beta2), KEY("optim", "eps", Float, eps),
    KEY("optim", "reduction", Str, reduction),
    KEY("schedule", "name", Str, schedule), KEY("schedule", "warmup_epochs", Float, warmup_epochs),
    KEY("schedule", "step_epochs", Int, step_epochs), KEY("schedule", "gamma", Float, gamma),
    KEY("schedule", "min_lr", Float, min_lr), KEY("schedule", "plan_epochs", Int, plan_epochs),
    KEY("augment", "shift", Int, shift), KEY("augment", "rotate", Float, rotate),
    KEY("augment", "scale", Float, scale), KEY("augment", "elastic_alpha", Float, elastic_alpha),
    KEY("augment", "elastic_sigma", Float, elastic_sigma),
    KEY("train", "epochs", Int, epochs), KEY("train", "batch_size", Int, batch_size),
    KEY("train", "seed", Int, seed), KEY("train", "threads", Int, threads), KEY("train", "out", Str, out),
};
#undef KEY
const char* TABLES[] = {"model", "data", "optim", "schedule", "augment", "train"};

struct Choice {
    const char* table;
    const char* name;
    std::vector<std::string> allowed;  // sorted, as the message lists them
};
const Choice CHOICES[] = {{"optim", "name", {"adam", "momentum", "sgd"}},
                          {"optim", "reduction", {"mean", "sum"}},
                          {"schedule", "name", {"constant", "cosine", "step"}}};

struct Range {
    const char* table;
    const char* name;
    double lo, hi;
    const char* lo_text;
    const char* hi_text;
    bool exclusive_low;
};
const Range RANGES[] = {
    {"data", "val_split", 0.0, 0.5, "0.0", "0.5", false},
    {"optim", "lr", 0.0, 10.0, "0.0", "10.0", true},
    {"optim", "momentum", 0.0, 1.0, "0.0", "1.0", false},
    {"optim", "weight_decay", 0.0, 1.0, "0.0", "1.0", false},
    {"optim", "beta1", 0.0, 1.0, "0.0", "1.0", false},
    {"optim", "beta2", 0.0, 1.0, "0.0", "1.0", false},
    {"optim", "eps", 1e-30, 1.0, "1e-30", "1.0", true},
    {"schedule", "warmup_epochs", 0.0, 1e4, "0.0", "10000.0", false},
    {"schedule", "step_epochs", 1, 1e6, "1", "1000000", false},
    {"schedule", "gamma", 0.0, 1.0, "0.0", "1.0", false},
    {"schedule", "min_lr", 0.0, 10.0, "0.0", "10.0", false},
    {"schedule", "plan_epochs", 0, 1e5, "0", "100000", false},
    {"augment", "shift", 0, 14, "0", "14", false},
    {"augment", "rotate", 0.0, 180.0, "0.0", "180.0", false},
    {"augment", "scale", 0.0, 0.9, "0.0", "0.9", false},
    {"augment", "elastic_alpha", 0.0, 10.0, "0.0", "10.0", false},
    {"augment", "elastic_sigma", 2.0, 100.0, "2.0", "100.0", false},
    {"train", "epochs", 1, 1e5, "1", "100000", false},
    {"train", "batch_size", 1, 6e4, "1", "60000", false},
    {"train", "seed", 0, 9223372036854775807.0, "0", "9223372036854775807", false},
    {"train", "threads", 0, 1024, "0", "1024", false},
};
constexpr size_t MAX_FILE = 1 << 20;  // a config is a few hundred bytes: refuse to read a 10 GB log
constexpr int64_t MAX_PARAMS = 50000000;
constexpr int64_t MAX_ACTS = int64_t(1) << 28;

const Key* find_key(const std::string& table, const std::string& name) {
    for (const Key& k : KEYS)
        if (table == k.table && name == k.name) return &k;
    return nullptr;
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
    std::string s;
    for (size_t i = 0; i < v.size(); i++) s += (i ? sep : "") + v[i];
    return s;
}

std::string known_keys(const std::string& table) {
    std::vector<std::string> v;
    for (const Key& k : KEYS)
        if (table == k.table) v.push_back(k.name);
    return join(v, ", ");
}

// ---------------------------------------------------------------- Python's repr(), for the messages

std::string py_str(const std::string& s) {
    const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
    const char q = dq ? '"' : '\'';
    std::string out(1, q);
    for (unsigned char c : s) {
        if (c == '\\' || c == q) out += '\\', out += char(c);
        else if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c == '\r') out += "\\r";
        else if (c < 0x20 || c == 0x7f) {
            char b[8];
            std::snprintf(b, sizeof b, "\\x%02x", c);
            out += b;
        } else out += char(c);
    }
    return out + q;
}

std::string py_list(const std::vector<int64_t>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

std::string py_repr(const toml::node& n) {
    if (auto* s = n.as_string()) return py_str(s->get());
    if (auto* i = n.as_integer()) return std::to_string(i->get());
    if (auto* f = n.as_floating_point()) return py_float(f->get());
    if (auto* b = n.as_boolean()) return b->get() ? "True" : "False";
    if (auto* a = n.as_array()) {
        std::string s = "[";
        for (size_t i = 0; i < a->size(); i++) s += (i ? ", " : "") + py_repr(*a->get(i));
        return s + "]";
    }
    if (auto* t = n.as_table()) {
        std::string s = "{";
        for (auto&& [k, v] : *t) s += (s.size() > 1 ? ", " : "") + py_str(std::string(k.str())) + ": " + py_repr(v);
        return s + "}";
    }
    std::ostringstream o;  // dates and times
    n.visit([&](auto&& v) { o << v; });
    return o.str();
}

// Keys of a table in file order (toml++ keeps them sorted by name; Python reports the first in the file).
std::vector<std::pair<std::string, const toml::node*>> in_file_order(const toml::table& t) {
    std::vector<std::tuple<uint32_t, uint32_t, std::string, const toml::node*>> v;
    for (auto&& [k, n] : t) v.emplace_back(k.source().begin.line, k.source().begin.column, std::string(k.str()), &n);
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) {
        return std::make_pair(std::get<0>(a), std::get<1>(a)) < std::make_pair(std::get<0>(b), std::get<1>(b));
    });
    std::vector<std::pair<std::string, const toml::node*>> out;
    for (auto& e : v) out.emplace_back(std::get<2>(e), std::get<3>(e));
    return out;
}

void set_typed(Config& c, const Key& k, const toml::node& v, const std::string& source) {
    const std::string where = source + ": [" + k.table + "] " + k.name;
    void* p = k.at(c);
    switch (k.kind) {
    case Kind::List: {
        auto* a = v.as_array();
        std::vector<int64_t> out;
        bool ok = a != nullptr;
        for (size_t i = 0; ok && i < a->size(); i++) {
            ok = a->get(i)->is_integer();
            if (ok) out.push_back(a->get(i)->as_integer()->get());
        }
        if (!ok) throw NNError(where + " must be a list of whole numbers, like [784, 250, 250, 10]");
        *static_cast<std::vector<int64_t>*>(p) = out;
        return;
    }
    case Kind::Bool:
        if (!v.is_boolean()) throw NNError(where + " must be true or false, not " + py_repr(v));
        *static_cast<bool*>(p) = v.as_boolean()->get();
        return;
    case Kind::Int:
        if (!v.is_integer()) throw NNError(where + " must be a whole number, not " + py_repr(v));
        *static_cast<int64_t*>(p) = v.as_integer()->get();
        return;
    case Kind::Float: {
        if (!v.is_integer() && !v.is_floating_point()) throw NNError(where + " must be a number, not " + py_repr(v));
        double x = v.is_integer() ? double(v.as_integer()->get()) : v.as_floating_point()->get();
        if (!std::isfinite(x)) throw NNError(where + " must be finite, not " + py_float(x));
        *static_cast<double*>(p) = x;
        return;
    }
    case Kind::Str: {
        if (!v.is_string()) throw NNError(where + " must be a string, not " + py_repr(v));
        const std::string& s = v.as_string()->get();
        if (s.find('\0') != std::string::npos) throw NNError(where + " must not contain a NUL character");
        *static_cast<std::string*>(p) = s;
        return;
    }
    }
}

bool utf8_valid(const std::string& s) {
    std::string why;
    return json_object_valid("{\"s\":" + json_str(s) + "}", &why);
}

// A value as TOML or JSON text (the two agree for these types except strings).
std::string value_text(Config& c, const Key& k, bool toml_strings) {
    void* p = k.at(c);
    switch (k.kind) {
    case Kind::List: return py_list(*static_cast<std::vector<int64_t>*>(p));
    case Kind::Bool: return *static_cast<bool*>(p) ? "true" : "false";
    case Kind::Int: return std::to_string(*static_cast<int64_t*>(p));
    case Kind::Float: return py_float(*static_cast<double*>(p));
    case Kind::Str: break;
    }
    const std::string& s = *static_cast<std::string*>(p);
    if (!toml_strings) return json_str(s);
    std::string out = "\"";  // a TOML basic string: control characters escaped
    for (unsigned char ch : s) {
        if (ch == '"' || ch == '\\') out += '\\', out += char(ch);
        else if (ch < 0x20 || ch == 0x7f) {
            char b[8];
            std::snprintf(b, sizeof b, "\\u%04x", ch);
            out += b;
        } else out += char(ch);
    }
    return out + "\"";
}

std::string with_commas(int64_t n) {
    std::string s = std::to_string(n), out;
    for (size_t i = 0; i < s.size(); i++) {
        if (i && (s.size() - i) % 3 == 0) out += ',';
        out += s[i];
    }
    return out;
}

}  // namespace

std::string py_float(double x) {
    if (std::isnan(x)) return "nan";
    if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
    char buf[40];
    int prec = 1;
    for (; prec < 17; prec++) {  // the shortest %.*e that reads back exactly
        std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (std::strtod(buf, nullptr) == x) break;
    }
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
    std::string s = buf;
    const size_t e = s.find('e');
    const int exp10 = std::atoi(s.c_str() + e + 1);
    std::string sign = s[0] == '-' ? "-" : "", digits;
    for (size_t i = sign.size(); i < e; i++)
        if (s[i] != '.') digits += s[i];
    if (exp10 < -4 || exp10 >= 16) {  // 1e-08, 1.5e+16
        std::string m = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
        char eb[16];
        std::snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
        return sign + m + eb;
    }
    if (exp10 < 0) return sign + "0." + std::string(size_t(-exp10 - 1), '0') + digits;
    if (digits.size() <= size_t(exp10) + 1) return sign + digits + std::string(size_t(exp10) + 1 - digits.size(), '0') + ".0";
    return sign + digits.substr(0, size_t(exp10) + 1) + "." + digits.substr(size_t(exp10) + 1);
}

Config parse_config(const std::string& text, const std::string& source) {
    toml::table root;
    try {
        root = toml::parse(text, source);
    } catch (const toml::parse_error& e) {
        throw NNError(source + ": not valid TOML: " + std::string(e.description()) + " (at line " +
                      std::to_string(e.source().begin.line) + ", column " + std::to_string(e.source().begin.column) + ")");
    }
    Config c;
    for (auto& [table, node] : in_file_order(root)) {
        if (std::find(std::begin(TABLES), std::end(TABLES), table) == std::end(TABLES))
            throw NNError(source + ": unknown table [" + table + "] (known: " +
                          join(std::vector<std::string>(std::begin(TABLES), std::end(TABLES)), ", ") + ")");
        if (!node->is_table()) throw NNError(source + ": '" + table + "' must be a table like [" + table + "]");
        for (auto& [name, value] : in_file_order(*node->as_table())) {
            const Key* k = find_key(table, name);
            if (!k)
                throw NNError(source + ": unknown key '" + name + "' in [" + table + "] (known: " + known_keys(table) + ")");
            set_typed(c, *k, *value, source);
        }
    }
    check_config(c, source);
    return c;
}

// The configs that ship with nn-numba (nn_numba/configs/), which `--config NAME` names as nn-numba does.
static const char* const SHIPPED[] = {"default", "best", "no-augment", "seed"};

Config load_config(const std::string& given) {
    std::string path = given;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {  // a file that exists wins over a name
        for (const char* name : SHIPPED)
            if (given == name) path = std::string(NN_CONFIGS) + "/" + name + ".toml";
        if (path == given || ::stat(path.c_str(), &st) != 0)
            throw NNError("no such config file " + given + ": give a path or one of: default, best, no-augment, seed");
    }
    if (::stat(path.c_str(), &st) != 0) throw NNError(path + ": cannot read: " + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) throw NNError(path + ": is a folder, not a config file");
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw NNError(path + ": cannot read: " + std::strerror(errno));
    std::string text;
    char buf[1 << 16];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) {  // in pieces, never more than the limit
        text.append(buf, got);
        if (text.size() > MAX_FILE) {
            std::fclose(f);
            throw NNError(path + ": larger than " + std::to_string(MAX_FILE / 1024) +
                          " KB, not a config file (a config is TOML, see `nn-numba configs default`)");
        }
    }
    const bool failed = std::ferror(f);
    std::fclose(f);
    if (failed) throw NNError(path + ": cannot read: " + std::strerror(errno));
    if (!utf8_valid(text)) throw NNError(path + ": not a text file (a config is TOML, see `nn-numba configs default`)");
    return parse_config(text, path);
}

void check_config(const Config& cc, const std::string& source) {
    Config& c = const_cast<Config&>(cc);  // the key table hands out mutable pointers; nothing is written
    for (const Choice& ch : CHOICES) {
        const std::string& v = *static_cast<std::string*>(find_key(ch.table, ch.name)->at(c));
        if (std::find(ch.allowed.begin(), ch.allowed.end(), v) == ch.allowed.end())
            throw NNError(source + ": [" + ch.table + "] " + ch.name + " = " + py_str(v) + " is not one of " +
                          join(ch.allowed, ", "));
    }
    for (const Range& r : RANGES) {
        const Key* k = find_key(r.table, r.name);
        double v;
        std::string shown;
        if (k->kind == Kind::Int) {
            int64_t i = *static_cast<int64_t*>(k->at(c));
            v = double(i);
            shown = std::to_string(i);
        } else {
            v = *static_cast<double*>(k->at(c));
            shown = py_float(v);
        }
        const bool low_ok = r.exclusive_low ? v > r.lo : v >= r.lo;
        if (!(low_ok && v <= r.hi))
            throw NNError(source + ": [" + r.table + "] " + r.name + " = " + shown + " is out of range " +
                          (r.exclusive_low ? "(" : "[") + r.lo_text + ", " + r.hi_text + "]");
    }
    const auto& sz = c.sizes;
    if (sz.size() < 2 || sz.size() > 65)
        throw NNError(source + ": [model] sizes needs 2 to 65 entries, got " + std::to_string(sz.size()));
    if (sz.front() != 784 || sz.back() != 10)
        throw NNError(source + ": [model] sizes must start at 784 (28x28 pixels) and end at 10 (digits) for MNIST, got " +
                      py_list(sz));
    for (int64_t n : sz)
        if (n < 1 || n > 100000)
            throw NNError(source + ": [model] sizes must each be between 1 and 100000, got " + py_list(sz));
    int64_t params = 0, acts = 0;
    for (size_t l = 0; l + 1 < sz.size(); l++) params += sz[l] * sz[l + 1] + sz[l + 1], acts += sz[l + 1];
    if (params > MAX_PARAMS)
        throw NNError(source + ": [model] sizes " + py_list(sz) + " make " + with_commas(params) +
                      " parameters, more than this trainer's " + with_commas(MAX_PARAMS) + ": use narrower layers");
    if (c.batch_size * acts > MAX_ACTS)
        throw NNError(source + ": [train] batch_size " + std::to_string(c.batch_size) + " x " + std::to_string(acts) +
                      " neurons needs more than " + with_commas(MAX_ACTS) +
                      " activations per mini-batch: use a smaller batch_size");
    for (const Key* k : {find_key("data", "dir"), find_key("train", "out")}) {
        const std::string& v = *static_cast<std::string*>(k->at(c));
        if (v.find('\0') != std::string::npos || !utf8_valid(v))
            throw NNError(source + ": [" + k->table + "] " + k->name + " = " + py_str(v) + " is not a usable path");
    }
}

void set_config_key(Config& c, const std::string& table, const std::string& key, const std::string& text) {
    const Key* k = find_key(table, key);
    if (!k) throw NNError("command line: unknown key '" + key + "' in [" + table + "]");
    const std::string where = "command line: [" + table + "] " + key;
    void* p = k->at(c);
    switch (k->kind) {
    case Kind::Str:
        *static_cast<std::string*>(p) = text;
        return;
    case Kind::Bool:
        if (text != "true" && text != "false") throw NNError(where + " must be true or false, not " + py_str(text));
        *static_cast<bool*>(p) = text == "true";
        return;
    case Kind::Float: {
        char* end = nullptr;
        errno = 0;
        double x = text.empty() ? 0 : std::strtod(text.c_str(), &end);
        if (text.empty() || *end || std::isspace(static_cast<unsigned char>(text[0])))
            throw NNError(where + " must be a number, not " + py_str(text));
        if (!std::isfinite(x)) throw NNError(where + " must be finite, not " + py_float(x));
        *static_cast<double*>(p) = x;
        return;
    }
    case Kind::Int: {
        char* end = nullptr;
        errno = 0;
        long long x = text.empty() ? 0 : std::strtoll(text.c_str(), &end, 10);
        if (text.empty() || *end || std::isspace(static_cast<unsigned char>(text[0])))
            throw NNError(where + " must be a whole number, not " + py_str(text));
        if (errno == ERANGE) {  // beyond 64 bits: out of every range; say so before anything narrows it
            for (const Range& r : RANGES)
                if (table == r.table && key == r.name)
                    throw NNError(where + " = " + text + " is out of range [" + r.lo_text + ", " + r.hi_text + "]");
            throw NNError(where + " = " + text + " is too large");
        }
        *static_cast<int64_t*>(p) = x;
        return;
    }
    case Kind::List: {
        std::vector<int64_t> v;
        size_t pos = 0;
        while (pos <= text.size()) {
            size_t q = text.find_first_of(",-", pos);
            if (q == std::string::npos) q = text.size();
            std::string part = text.substr(pos, q - pos);
            char* end = nullptr;
            errno = 0;
            long long x = part.empty() ? 0 : std::strtoll(part.c_str(), &end, 10);
            if (part.empty() || *end || errno == ERANGE || std::isspace(static_cast<unsigned char>(part[0])))
                throw NNError(where + " must be a list of whole numbers, like 784,250,250,10, not " + py_str(text));
            v.push_back(x);
            pos = q + 1;
        }
        *static_cast<std::vector<int64_t>*>(p) = v;
        return;
    }
    }
}

std::string config_toml(const Config& cc) {
    Config& c = const_cast<Config&>(cc);
    std::string out;
    for (const char* t : TABLES) {
        out += std::string("[") + t + "]\n";
        for (const Key& k : KEYS)
            if (std::string(t) == k.table) out += std::string(k.name) + " = " + value_text(c, k, true) + "\n";
        if (std::string(t) != "train") out += "\n";
    }
    return out;
}

std::string config_json(const Config& cc) {
    Config& c = const_cast<Config&>(cc);
    std::string out = "{";
    for (const char* t : TABLES) {
        out += std::string(out.size() > 1 ? ", " : "") + "\"" + t + "\": {";
        bool first = true;
        for (const Key& k : KEYS)
            if (std::string(t) == k.table) {
                out += std::string(first ? "" : ", ") + "\"" + k.name + "\": " + value_text(c, k, false);
                first = false;
            }
        out += "}";
    }
    return out + "}";
}
