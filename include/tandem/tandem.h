#pragma once
// tandem: data-parallel training for LibTorch. The umbrella header.
#include "tandem/ckpt/checkpoint.h"
#include "tandem/collectives/ring_allreduce.h"
#include "tandem/comm/checked.h"
#include "tandem/comm/communicator.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/data/dataset.h"
#include "tandem/data/idx.h"
#include "tandem/data/loader.h"
#include "tandem/data/sampler.h"
#include "tandem/models/models.h"
#include "tandem/models/weights.h"
#include "tandem/sync/compress.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/ps.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/train/trainer.h"
#include "tandem/util/check.h"
#include "tandem/config.h"
#if TANDEM_HAVE_SERVE
#include "tandem/serve/server.h"
#endif
