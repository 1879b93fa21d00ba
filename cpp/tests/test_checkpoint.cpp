// Checkpoint reader/writer: the shared example file, round trips, and one test per
// way a file can be wrong (each must be a clean NNError naming the problem).
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "checkpoint.h"
#include "file.h"
#include "minijson.h"
#include "mlp.h"

using Bytes = std::vector<uint8_t>;

static void set_u32(Bytes& b, size_t off, uint32_t v) {
    for (int i = 0; i < 4; i++) b[off + i] = uint8_t(v >> (8 * i));
}
static void add_u32(Bytes& b, uint32_t v) {
    for (int i = 0; i < 4; i++) b.push_back(uint8_t(v >> (8 * i)));
}
static void add_u64(Bytes& b, uint64_t v) {
    add_u32(b, uint32_t(v));
    add_u32(b, uint32_t(v >> 32));
}
// Recompute the trailing CRC so that a test reaches the check behind it.
static Bytes fix_crc(Bytes b) {
    set_u32(b, b.size() - 4, uint32_t(crc32(0L, b.data(), uInt(b.size() - 4))));
    return b;
}
struct Section {
    std::string tag;
    uint32_t flags;
    std::string payload;
};
// prefix (header + parameters) + sections + valid CRC
static Bytes assemble(const Bytes& prefix, const std::vector<Section>& secs, const std::string& extra = "") {
    Bytes b = prefix;
    for (const auto& s : secs) {
        b.insert(b.end(), s.tag.begin(), s.tag.end());
        add_u32(b, s.flags);
        add_u64(b, s.payload.size());
        b.insert(b.end(), s.payload.begin(), s.payload.end());
    }
    b.insert(b.end(), extra.begin(), extra.end());
    add_u32(b, 0);
    return fix_crc(b);
}
static std::string optm(uint32_t kind, uint32_t slots, size_t nfloats, float fill = 0.25f) {
    Bytes b;
    add_u32(b, kind);
    add_u32(b, slots);
    add_u64(b, 3);
    for (size_t i = 0; i < nfloats; i++) {
        uint32_t u;
        std::memcpy(&u, &fill, 4);
        add_u32(b, u);
    }
    return std::string(b.begin(), b.end());
}

static void test_tiny() {
    const std::string path = std::string(NN_TEST_DATA) + "/tiny.ck";
    Bytes file = read_file(path);
    Bytes js = read_file(std::string(NN_TEST_DATA) + "/tiny.json");
    std::string jtext(js.begin(), js.end());
    const char* p = jtext.c_str();
    JVal ref = jparse(p);

    Checkpoint ck = load_checkpoint(path);
    CHECK(ck.sizes.size() == ref["sizes"].arr.size());
    for (size_t i = 0; i < ck.sizes.size(); i++) CHECK(ck.sizes[i] == uint32_t(ref["sizes"][i].num));
    CHECK(file.size() == size_t(ref["file_bytes"].num));
    CHECK(uint32_t(crc32(0L, file.data(), uInt(file.size() - 4))) == uint32_t(ref["crc32"].num));
    // every number in tiny.json is a float32 written as a double: comparisons are exact
    for (size_t l = 0; l + 1 < ck.sizes.size(); l++) {
        for (uint32_t o = 0; o < ck.sizes[l + 1]; o++) {
            for (uint32_t i = 0; i < ck.sizes[l]; i++)
                CHECK(ck.W[l][size_t(o) * ck.sizes[l] + i] == float(ref["weights"][l][o][i].num));
            CHECK(ck.B[l][o] == float(ref["biases"][l][o].num));
        }
    }
    // META as written, parsed back, agrees key by key
    const char* mp = ck.meta.c_str();
    JVal meta = jparse(mp);
    for (const auto& kv : ref["meta"].obj) {
        CHECK(meta.obj.count(kv.first) == 1);
        if (kv.second.kind == JVal::Num) CHECK(meta[kv.first].num == kv.second.num);
        if (kv.second.kind == JVal::Str) CHECK(meta[kv.first].str == kv.second.str);
    }
    // OPTM
    const char* kinds[] = {"sgd", "momentum", "adam"};
    CHECK(ck.has_optim);
    CHECK(ref["optim"]["kind"].str == kinds[ck.optim.kind]);
    CHECK(ck.optim.step == uint64_t(ref["optim"]["step"].num));
    const JVal& slots = ref["optim"]["slots"];
    CHECK(ck.optim.slots.size() == slots.arr.size());
    for (size_t s = 0; s < std::min(ck.optim.slots.size(), slots.arr.size()); s++)
        for (size_t a = 0; a < ck.optim.slots[s].size(); a++) {
            const JVal& arr = slots[s][a];
            std::vector<float> flat;
            for (const auto& x : arr.arr) {
                if (x.kind == JVal::Arr)
                    for (const auto& y : x.arr) flat.push_back(float(y.num));
                else
                    flat.push_back(float(x.num));
            }
            CHECK(flat == ck.optim.slots[s][a]);
        }
    // our writer reproduces the Python writer's file byte for byte
    CHECK(serialize_checkpoint(ck) == file);
    // architecture check
    load_checkpoint(path, {4, 3, 2});
    expect_error("arch", [&] { load_checkpoint(path, {784, 250, 250, 10}); },
                 "architecture mismatch: has sizes 4-3-2, expected 784-250-250-10");
}

static void test_round_trip() {
    char dir[] = "/tmp/nncpp-ck-XXXXXX";
    CHECK(mkdtemp(dir) != nullptr);
    const std::string path = std::string(dir) + "/net.ck";
    Rng rng(7);
    Net net = he_init({5, 7, 3}, rng);
    Optimizer opt(2, net);
    for (auto& slot : opt.slot0)
        for (auto& x : slot) x = float(rng.normal());
    for (auto& slot : opt.slot1)
        for (auto& x : slot) x = float(rng.uniform());
    opt.t = 42;
    Checkpoint ck{net.sizes, net.W, net.B, "{\"producer\":\"nn-cpp 0.1.0\",\"note\":\"\xc3\xa9t\xc3\xa9\"}", true,
                  opt.state()};
    save_checkpoint(ck, path);
    Checkpoint back = load_checkpoint(path);
    CHECK(back.sizes == ck.sizes && back.W == ck.W && back.B == ck.B && back.meta == ck.meta);
    CHECK(back.has_optim && back.optim.kind == 2 && back.optim.step == 42 && back.optim.slots == ck.optim.slots);
    CHECK(access((path + ".tmp-" + std::to_string(getpid())).c_str(), F_OK) != 0);  // no stray temp file
    // no META, no OPTM
    Checkpoint bare{net.sizes, net.W, net.B, "", false, {}};
    save_checkpoint(bare, path);
    back = load_checkpoint(path);
    CHECK(back.meta.empty() && !back.has_optim && back.W == net.W);
    // a NaN is refused and the file already there stays as it was
    Bytes before = read_file(path);
    Checkpoint bad = bare;
    bad.W[1][3] = std::nanf("");
    expect_error("save NaN", [&] { save_checkpoint(bad, path); }, "NaN/Inf");
    CHECK(read_file(path) == before);
    // unwritable folder: an error, not a crash
    expect_error("save missing dir", [&] { save_checkpoint(bare, std::string(dir) + "/no/such/x.ck"); },
                 "cannot write");
    unlink(path.c_str());
    rmdir(dir);
}

static void test_corrupt() {
    const Bytes good = read_file(std::string(NN_TEST_DATA) + "/tiny.ck");
    auto parse = [](const Bytes& b) { return [b] { parse_checkpoint(b, "bad.ck"); }; };
    const size_t P = 36 + 4 * (12 + 3 + 6 + 2);  // header + parameters of 4-3-2
    const Bytes prefix(good.begin(), good.begin() + P);
    const size_t nparam = 23;

    expect_error("empty", parse({}), "not an nn-numba checkpoint");
    Bytes b = good;
    b[3] = 'X';
    expect_error("magic", parse(b), "not an nn-numba checkpoint");
    expect_error("short", parse(Bytes{'N', 'N', 'C', 'K', 1}), "truncated");
    expect_error("27 bytes", parse(Bytes(good.begin(), good.begin() + 27)), "truncated");
    b = good;
    set_u32(b, 4, 2);
    expect_error("newer", parse(fix_crc(b)), "newer nn-numba (format version 2, this reader knows 1): upgrade");
    set_u32(b, 4, 2);
    expect_error("newer, bad crc too", parse(b), "upgrade");  // version is checked before the CRC
    set_u32(b, 4, 0);
    expect_error("version 0", parse(fix_crc(b)), "bad header field version=0");
    b = good;
    b[50] ^= 1;
    expect_error("flipped bit", parse(b), "corrupt (checksum mismatch");
    expect_error("cut short", parse(Bytes(good.begin(), good.end() - 10)), "truncated");
    expect_error("cut in params", parse(Bytes(good.begin(), good.begin() + 60)), "truncated");
    struct Field {
        size_t off;
        uint32_t val;
        const char* phrase;
    } fields[] = {{12, 2, "bad header field dtype=2"},        {16, 0, "bad header field activation=0"},
                  {20, 0, "bad header field L=0"},            {20, 65, "bad header field L=65"},
                  {20, 3, "bad header field header_bytes=36"}, {8, 40, "bad header field header_bytes=40"},
                  {24, 0, "bad header field sizes=0-3-2"},    {28, 1000001, "bad header field sizes"}};
    for (const auto& f : fields) {
        b = good;
        set_u32(b, f.off, f.val);
        expect_error(f.phrase, parse(fix_crc(b)), f.phrase);
    }
    // a header that lies about the sizes: must say truncated without allocating 4 TB
    b = good;
    set_u32(b, 24, 1000000);
    set_u32(b, 28, 1000000);
    expect_error("lying sizes", parse(fix_crc(b)), "truncated");
    expect_error("lying sizes, bad crc", parse(b), "truncated");
    // sections
    parse_checkpoint(assemble(prefix, {}), "ok");                                        // none at all
    parse_checkpoint(assemble(prefix, {{"ZZZZ", 7, "whatever"}, {"META", 0, "{}"}}), "ok");  // unknown: skipped
    expect_error("trailing", parse(assemble(prefix, {{"META", 0, "{}"}}, "abcde")), "trailing bytes");
    Bytes t = assemble(prefix, {{"META", 0, "{\"a\":1}"}});
    set_u32(t, P + 8, 1000);
    expect_error("section runs past end", parse(fix_crc(t)), "truncated");
    set_u32(t, P + 12, 0xffffffffu);  // n near 2^64: no overflow in the bounds check
    expect_error("huge section", parse(fix_crc(t)), "truncated");
    expect_error("meta flags", parse(assemble(prefix, {{"META", 1, "{}"}})), "bad section META flags=1");
    expect_error("duplicate", parse(assemble(prefix, {{"META", 0, "{}"}, {"META", 0, "{}"}})), "duplicate META");
    expect_error("tag", parse(assemble(prefix, {{"M\xc3\xa9T", 0, ""}})), "bad section tag");
    for (const char* bad : {"not json", "[1,2]", "{\"a\":NaN}", "{\"a\":Infinity}", "{\"a\":1} x", "{\"a\":}",
                            "{\"a\":\"\xff\"}", "{\"a\":\"\xed\xa0\x80\"}", "", "{\"a\":01}"})
        expect_error(bad, parse(assemble(prefix, {{"META", 0, bad}})), "bad META JSON");
    Checkpoint m = parse_checkpoint(
        assemble(prefix, {{"META", 0, " {\"rng\":{\"state\":340282366920938463463374607431768211455},\"x\":[1.5e-3,true,null,\"\\u00e9\"]} "}}),
        "ok");
    CHECK(m.meta.find("rng") != std::string::npos);
    // OPTM
    parse_checkpoint(assemble(prefix, {{"OPTM", 0, optm(2, 2, 2 * nparam)}}), "ok");
    expect_error("optm short", parse(assemble(prefix, {{"OPTM", 0, "abc"}})), "bad OPTM payload");
    expect_error("optm kind", parse(assemble(prefix, {{"OPTM", 0, optm(3, 3, 3 * nparam)}})), "bad OPTM payload");
    expect_error("optm slots", parse(assemble(prefix, {{"OPTM", 0, optm(1, 2, 2 * nparam)}})), "bad OPTM payload");
    expect_error("optm length", parse(assemble(prefix, {{"OPTM", 0, optm(1, 1, nparam - 1)}})), "bad OPTM payload");
    expect_error("optm NaN", parse(assemble(prefix, {{"OPTM", 0, optm(1, 1, nparam, std::nanf(""))}})),
                 "bad OPTM payload (NaN/Inf");
    // non-finite parameters
    b = good;
    set_u32(b, 36 + 4 * 5, 0x7fc00000u);  // NaN in W1
    expect_error("nan W1", parse(fix_crc(b)), "NaN/Inf in W1");
    b = good;
    set_u32(b, P - 4, 0xff800000u);  // -Inf, last float of B2
    expect_error("inf B2", parse(fix_crc(b)), "NaN/Inf in B2");
    // every message names the file
    expect_error("names file", parse({}), "bad.ck: ");
    expect_error("missing file", [] { load_checkpoint("/nonexistent/x.ck"); }, "/nonexistent/x.ck: cannot open");
    // every single-byte truncation is an error, never a crash (the sanitizer build checks for overreads)
    for (size_t n = 0; n < good.size(); n++) {
        Bytes c(good.begin(), good.begin() + n);
        g_checks++;
        try {
            parse_checkpoint(c, "x");
            g_failures++;
            std::fprintf(stderr, "prefix of %zu bytes accepted\n", n);
        } catch (const NNError&) {
        }
    }
}

// Files that are not checkpoints, or that claim far more than they hold: refused after reading the
// header, without blocking and without memory in proportion to the claim or to an endless file.
static void test_hostile_files() {
    char tmp[] = "/tmp/nncpp-hostile-XXXXXX";
    CHECK(mkdtemp(tmp) != nullptr);
    const std::string dir = tmp;
    CHECK(mkfifo((dir + "/fifo.ck").c_str(), 0600) == 0);
    expect_bounded("fifo", [&] { load_checkpoint(dir + "/fifo.ck"); }, "fifo.ck: is a FIFO, not a checkpoint file", 64);
    expect_bounded("dev zero", [] { load_checkpoint("/dev/zero"); }, "/dev/zero: is a character device", 64);
    CHECK(symlink("/dev/zero", (dir + "/zero.ck").c_str()) == 0);
    expect_bounded("link to dev zero", [&] { load_checkpoint(dir + "/zero.ck"); }, "zero.ck: is a character device", 64);
    expect_bounded("folder", [&] { load_checkpoint(dir); }, "is a directory, not a checkpoint file", 64);
    // 512 MB (sparse) of something else: four bytes tell, the rest is never read
    auto sparse = [&](const std::string& name, const Bytes& head, off_t size) {
        std::string p = dir + "/" + name;
        int fd = open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        CHECK(fd >= 0 && write(fd, head.data(), head.size()) == ssize_t(head.size()) && ftruncate(fd, size) == 0);
        close(fd);
        return p;
    };
    std::string big = sparse("big.ck", Bytes{'J', 'U', 'N', 'K'}, off_t(512) << 20);
    expect_bounded("big non-checkpoint", [&] { load_checkpoint(big); }, "not an nn-numba checkpoint", 64);
    // a 256 MB file whose header promises a 1000000-1000000 net (4 TB): truncated, from the header alone
    Bytes head = read_file(std::string(NN_TEST_DATA) + "/tiny.ck");
    head.resize(36);
    set_u32(head, 24, 1000000);
    set_u32(head, 28, 1000000);
    big = sparse("claims.ck", head, off_t(256) << 20);
    expect_bounded("header claims 4 TB", [&] { load_checkpoint(big); }, "truncated (268435456 bytes, sizes", 64);
    std::string rm = "rm -rf " + dir;
    CHECK(std::system(rm.c_str()) == 0);
}

int main() {
    try {
        test_tiny();
        test_round_trip();
        test_corrupt();
        test_hostile_files();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    return finish("test_checkpoint");
}
