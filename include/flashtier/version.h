/* SPDX-License-Identifier: MIT */
#ifndef FLASHTIER_VERSION_H
#define FLASHTIER_VERSION_H

#define FLASHTIER_VERSION "0.1.0"

#endif
