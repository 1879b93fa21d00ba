#include "json.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace {

// Recursive-descent validator over [p, end). Depth-limited so a hostile file of
// 10^6 '[' cannot overflow the stack.
struct Parser {
    const char* p;
    const char* end;
    std::string err;
    int depth = 0;

    bool fail(const char* what) {
        if (err.empty()) err = std::string(what) + " at byte " + std::to_string(p - start);
        return false;
    }
    const char* start;
    void ws() {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    }
    bool lit(const char* s) {
        size_t n = std::strlen(s);
        if (size_t(end - p) >= n && std::memcmp(p, s, n) == 0) {
            p += n;
            return true;
        }
        return false;
    }
    bool string() {
        if (p >= end || *p != '"') return fail("expected string");
        p++;
        while (p < end && *p != '"') {
            unsigned char c = *p;
            if (c < 0x20) return fail("control character in string");
            if (c == '\\') {
                p++;
                if (p >= end) return fail("unterminated escape");
                if (*p == 'u') {
                    for (int i = 1; i <= 4; i++)
                        if (p + i >= end || !std::isxdigit((unsigned char)p[i])) return fail("bad \\u escape");
                    p += 5;
                    continue;
                }
                if (!std::strchr("\"\\/bfnrt", *p)) return fail("bad escape");
            }
            p++;
        }
        if (p >= end) return fail("unterminated string");
        p++;
        return true;
    }
    bool number() {
        const char* s = p;
        if (p < end && *p == '-') p++;
        if (p < end && *p == '0') p++;
        else if (p < end && *p >= '1' && *p <= '9') while (p < end && std::isdigit((unsigned char)*p)) p++;
        else return fail("bad number");
        if (p < end && *p == '.') {
            p++;
            if (p >= end || !std::isdigit((unsigned char)*p)) return fail("bad fraction");
            while (p < end && std::isdigit((unsigned char)*p)) p++;
        }
        if (p < end && (*p == 'e' || *p == 'E')) {
            p++;
            if (p < end && (*p == '+' || *p == '-')) p++;
            if (p >= end || !std::isdigit((unsigned char)*p)) return fail("bad exponent");
            while (p < end && std::isdigit((unsigned char)*p)) p++;
        }
        return p > s;
    }
    bool value() {
        if (++depth > 500) return fail("nested too deeply");
        ws();
        bool ok;
        if (p >= end) ok = fail("unexpected end");
        else if (*p == '{') ok = object();
        else if (*p == '[') ok = array();
        else if (*p == '"') ok = string();
        else if (lit("true") || lit("false") || lit("null")) ok = true;
        else ok = number();
        depth--;
        return ok;
    }
    bool object() {
        p++;  // '{'
        ws();
        if (p < end && *p == '}') return ++p, true;
        for (;;) {
            ws();
            if (!string()) return false;
            ws();
            if (p >= end || *p != ':') return fail("expected ':'");
            p++;
            if (!value()) return false;
            ws();
            if (p < end && *p == ',') { p++; continue; }
            if (p < end && *p == '}') return ++p, true;
            return fail("expected ',' or '}'");
        }
    }
    bool array() {
        p++;  // '['
        ws();
        if (p < end && *p == ']') return ++p, true;
        for (;;) {
            if (!value()) return false;
            ws();
            if (p < end && *p == ',') { p++; continue; }
            if (p < end && *p == ']') return ++p, true;
            return fail("expected ',' or ']'");
        }
    }
};

bool utf8_valid(const std::string& s, size_t* bad) {
    const unsigned char* u = reinterpret_cast<const unsigned char*>(s.data());
    size_t n = s.size(), i = 0;
    while (i < n) {
        unsigned c = u[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (len == 0 || i + len > n) return *bad = i, false;
        unsigned cp = len == 1 ? c : c & (0x7f >> len);
        for (size_t k = 1; k < len; k++) {
            if ((u[i + k] & 0xc0) != 0x80) return *bad = i, false;
            cp = cp << 6 | (u[i + k] & 0x3f);
        }
        // reject overlong forms, surrogates and > U+10FFFF, as Python's strict decoder does
        static const unsigned min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) return *bad = i, false;
        i += len;
    }
    return true;
}

}  // namespace

bool json_object_valid(const std::string& text, std::string* why) {
    size_t bad;
    if (!utf8_valid(text, &bad)) {
        *why = "invalid UTF-8 at byte " + std::to_string(bad);
        return false;
    }
    Parser ps{text.data(), text.data() + text.size(), "", 0, text.data()};
    ps.ws();
    if (ps.p >= ps.end || *ps.p != '{') {
        *why = "not an object";
        return false;
    }
    if (!ps.value()) {
        *why = ps.err;
        return false;
    }
    ps.ws();
    if (ps.p != ps.end) {
        *why = "extra data after the object";
        return false;
    }
    return true;
}

std::string json_str(const std::string& s) {
    std::string o = "\"";
    for (unsigned char c : s) {
        if (c == '"') o += "\\\"";
        else if (c == '\\') o += "\\\\";
        else if (c == '\n') o += "\\n";
        else if (c < 0x20) {
            char b[8];
            std::snprintf(b, sizeof b, "\\u%04x", c);
            o += b;
        } else o += char(c);
    }
    return o + "\"";
}

std::string json_num(double x, int digits) {
    if (!std::isfinite(x)) return "null";
    char b[40];
    if (digits > 0) {
        std::snprintf(b, sizeof b, "%.*g", digits, x);
        return b;
    }
    auto r = std::to_chars(b, b + sizeof b, x);
    return std::string(b, r.ptr);
}

std::string json_num(float x) {
    if (!std::isfinite(x)) return "null";
    char b[40];
    auto r = std::to_chars(b, b + sizeof b, x);
    return std::string(b, r.ptr);
}
