// Fuzz target: any bytes as a checkpoint file. Only NNError may come out (ASan/UBSan catch the
// rest), and a file that is accepted goes through the writer and back to the same checkpoint.
#include <cstdlib>

#include "checkpoint.h"
#include "error.h"
#include "memfile.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Checkpoint ck;
    try {
        ck = load_checkpoint(memfile(data, size));
    } catch (const NNError&) {
        return 0;
    }
    Checkpoint back = parse_checkpoint(serialize_checkpoint(ck), "round trip");
    if (back.sizes != ck.sizes || back.W != ck.W || back.B != ck.B || back.meta != ck.meta ||
        back.has_optim != ck.has_optim || back.optim.kind != ck.optim.kind || back.optim.step != ck.optim.step ||
        back.optim.slots != ck.optim.slots)
        std::abort();
    return 0;
}
