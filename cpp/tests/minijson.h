// A tiny JSON DOM, only for reading tests/data/tiny.json in the tests.
#pragma once
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct JVal {
    enum Kind { Null, Bool, Num, Str, Arr, Obj } kind = Null;
    double num = 0;
    std::string str;
    std::vector<JVal> arr;
    std::map<std::string, JVal> obj;
    const JVal& operator[](const std::string& k) const {
        auto it = obj.find(k);
        if (it == obj.end()) throw std::runtime_error("tiny.json: missing key " + k);
        return it->second;
    }
    const JVal& operator[](size_t i) const { return arr.at(i); }
};

inline JVal jparse(const char*& p) {
    while (std::isspace((unsigned char)*p)) p++;
    JVal v;
    if (*p == '{') {
        v.kind = JVal::Obj;
        p++;
        for (;;) {
            while (std::isspace((unsigned char)*p) || *p == ',') p++;
            if (*p == '}') { p++; break; }
            JVal k = jparse(p);
            while (std::isspace((unsigned char)*p) || *p == ':') p++;
            v.obj[k.str] = jparse(p);
        }
    } else if (*p == '[') {
        v.kind = JVal::Arr;
        p++;
        for (;;) {
            while (std::isspace((unsigned char)*p) || *p == ',') p++;
            if (*p == ']') { p++; break; }
            v.arr.push_back(jparse(p));
        }
    } else if (*p == '"') {
        v.kind = JVal::Str;
        for (p++; *p != '"'; p++) {
            if (*p == '\\') p++;
            v.str += *p;
        }
        p++;
    } else if (!std::strncmp(p, "true", 4) || !std::strncmp(p, "false", 5)) {
        v.kind = JVal::Bool;
        v.num = *p == 't';
        p += *p == 't' ? 4 : 5;
    } else if (!std::strncmp(p, "null", 4)) {
        p += 4;
    } else {
        v.kind = JVal::Num;
        char* e;
        v.num = std::strtod(p, &e);
        if (e == p) throw std::runtime_error("tiny.json: bad value");
        p = e;
    }
    return v;
}
