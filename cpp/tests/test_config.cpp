// TOML configs: a recipe reads as nn_numba.config reads it, the resolved config goes back to
// TOML unchanged, and bad keys, types and ranges give nn_numba.config's messages word for word
// (tests/test_cpp.py compares the two programs on more cases).
#include <string>

#include "check.h"
#include "config.h"

static Config parse(const std::string& text) { return parse_config(text, "x.toml"); }

int main() {
    // a recipe written out here, so that retuning the shipped configs does not change what this test reads
    const std::string recipe =
        "[model]\nsizes = [784, 250, 250, 10]\n[data]\nval_split = 0.1\n"
        "[optim]\nname = \"adam\"\nlr = 1e-3\nreduction = \"mean\"\n[schedule]\nname = \"cosine\"\nwarmup_epochs = 0.5\n"
        "[augment]\nshift = 2\nrotate = 12.0\nscale = 0.12\nelastic_alpha = 2.0\nelastic_sigma = 4.0\n"
        "[train]\nepochs = 40\nbatch_size = 128\nseed = 0\n";
    Config d = parse(recipe);
    CHECK(load_config(NN_TEST_DATA "/../../configs/default.toml").sizes.size() == 4);  // the shipped file reads
    CHECK(d.schedule == "cosine" && d.warmup_epochs == 0.5 && d.step_epochs == 10 && d.epochs == 40);
    CHECK(d.batch_size == 128 && d.shift == 2 && d.rotate == 12.0 && d.scale == 0.12 && d.elastic_alpha == 2.0);
    CHECK(d.optim == "adam" && d.lr == 1e-3 && d.eps == 1e-8 && d.out == "runs" && d.sizes.size() == 4);
    const std::string toml = config_toml(d);
    CHECK(toml.find("[optim]\nname = \"adam\"\nlr = 0.001\n") != std::string::npos);
    CHECK(toml.find("eps = 1e-08\n") != std::string::npos && toml.find("rotate = 12.0\n") != std::string::npos);
    Config back = parse(toml);
    CHECK(config_toml(back) == toml && config_json(back) == config_json(d));

    Config e = parse("");  // the defaults of nn_numba/config.py
    CHECK(e.step_epochs == 10 && e.batch_size == 64 && e.schedule == "constant" && e.epochs == 10 && e.val_split == 0.1);
    CHECK(parse("[optim]\nlr = 1\n").lr == 1.0);  // a whole number where a float is wanted

    CHECK(py_float(0.1) == "0.1" && py_float(4.0) == "4.0" && py_float(1e-8) == "1e-08" && py_float(1e16) == "1e+16");
    CHECK(py_float(1e-4) == "0.0001" && py_float(123456.0) == "123456.0" && py_float(-2.5e-05) == "-2.5e-05");

    const std::pair<const char*, const char*> bad[] = {
        {"[optim]\nlrr = 1\n",
         "x.toml: unknown key 'lrr' in [optim] (known: name, lr, momentum, nesterov, weight_decay, beta1, beta2, eps, reduction)"},
        {"[optimizer]\n", "x.toml: unknown table [optimizer] (known: model, data, optim, schedule, augment, train)"},
        {"[optim]\nlr = 0\n", "x.toml: [optim] lr = 0.0 is out of range (0.0, 10.0]"},
        {"[optim]\neps = 0.0\n", "x.toml: [optim] eps = 0.0 is out of range (1e-30, 1.0]"},
        {"[train]\nepochs = 0\n", "x.toml: [train] epochs = 0 is out of range [1, 100000]"},
        {"[train]\nepochs = 1.5\n", "x.toml: [train] epochs must be a whole number, not 1.5"},
        {"[schedule]\nwarmup_epochs = 'x'\n", "x.toml: [schedule] warmup_epochs must be a number, not 'x'"},
        {"[schedule]\nwarmup_epochs = nan\n", "x.toml: [schedule] warmup_epochs must be finite, not nan"},
        {"[optim]\nname = \"rmsprop\"\n", "x.toml: [optim] name = 'rmsprop' is not one of adam, momentum, sgd"},
        {"[model]\nsizes = [784, 10.5]\n", "x.toml: [model] sizes must be a list of whole numbers, like [784, 250, 250, 10]"},
        {"[model]\nsizes = [784, 5]\n",
         "x.toml: [model] sizes must start at 784 (28x28 pixels) and end at 10 (digits) for MNIST, got [784, 5]"},
        {"[data]\nshuffle = 1\n", "x.toml: [data] shuffle must be true or false, not 1"},
        {"[model]\nsizes = [784, 10000, 10000, 10]\n",
         "x.toml: [model] sizes [784, 10000, 10000, 10] make 107,960,010 parameters, more than this trainer's 50,000,000: use narrower layers"},
        {"[augment]\nelastic_sigma = 1.0\n", "x.toml: [augment] elastic_sigma = 1.0 is out of range [2.0, 100.0]"},
        {"data = \"x\"\n", "x.toml: 'data' must be a table like [data]"},
        {"[train]\nseed = -1\n", "x.toml: [train] seed = -1 is out of range [0, 9223372036854775807]"},
        {"[train\n", "x.toml: not valid TOML: "},
    };
    for (auto& [text, msg] : bad) expect_error(text, [&] { parse(text); }, msg);

    Config c;
    set_config_key(c, "train", "epochs", "4294967297");  // held as 64 bits, then range-checked: no wrap-around
    expect_error("epochs", [&] { check_config(c, "command line"); },
                 "command line: [train] epochs = 4294967297 is out of range [1, 100000]");
    expect_error("seed", [&] { set_config_key(c, "train", "seed", "99999999999999999999"); },
                 "command line: [train] seed = 99999999999999999999 is out of range [0, 9223372036854775807]");
    expect_error("nan", [&] { set_config_key(c, "schedule", "warmup_epochs", "nan"); },
                 "command line: [schedule] warmup_epochs must be finite, not nan");
    expect_error("text", [&] { set_config_key(c, "train", "batch_size", "12x"); },
                 "command line: [train] batch_size must be a whole number, not '12x'");
    expect_error("missing", [&] { load_config("no-such.toml"); }, "no such config file no-such.toml: give a path or one of: default, best, no-augment, seed");
    expect_error("folder", [&] { load_config(NN_TEST_DATA); }, ": is a folder, not a config file");
    expect_error("binary", [&] { load_config(NN_TEST_DATA "/tiny.ck"); }, "not a text file");
    return finish("test_config");
}
