// The whole public API of kvmig.
#ifndef KVMIG_KVMIG_H_
#define KVMIG_KVMIG_H_

#include "kvmig/agent.h"
#include "kvmig/cluster.h"
#include "kvmig/digest.h"
#include "kvmig/pager.h"
#include "kvmig/snapshot.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"
#include "kvmig/types.h"

#endif  // KVMIG_KVMIG_H_
