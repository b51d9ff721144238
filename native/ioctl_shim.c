#include <sys/ioctl.h>

#include "ioctl_shim.h"

long nodedev_ioctl(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}

int nodedev_vfio_group_status(int fd, unsigned int *flags)
{
    struct vfio_group_status status = { .argsz = sizeof(status) };
    int rc = ioctl(fd, VFIO_GROUP_GET_STATUS, &status);

    if (rc == 0)
        *flags = status.flags;
    return rc;
}
