/* nodedev ioctl shim: the few ioctls the host and drivers need, called with
 * request numbers that come from the kernel headers at build time. */
#ifndef NODEDEV_IOCTL_SHIM_H
#define NODEDEV_IOCTL_SHIM_H

#include <linux/kvm.h>
#include <linux/vfio.h>

/* Runs ioctl(fd, request, arg). Returns the ioctl's result, or -1 with errno set. */
long nodedev_ioctl(int fd, unsigned long request, unsigned long arg);

/* VFIO_GROUP_GET_STATUS: fills *flags (VFIO_GROUP_FLAGS_*). Returns 0, or -1 with errno. */
int nodedev_vfio_group_status(int fd, unsigned int *flags);

#endif
