"""Prepares the loopback moto S3 server for tests/sources/run.sh: an IAM user with an S3
policy and an access key (moto enforces credentials once INITIAL_NO_AUTH_ACTION_COUNT
bootstrap calls are spent), a bucket, and a check that a wrong secret is refused. Prints
"KEY_ID SECRET"."""
import boto3, json, sys
ep = sys.argv[1]
kw = dict(endpoint_url=ep, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="loramux")
iam.put_user_policy(UserName="loramux", PolicyName="s3", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="loramux")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket="loramux-test")
try:
    boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key="wrong").list_objects_v2(Bucket="loramux-test")
    sys.exit("a wrong secret was accepted: auth is not enforced")
except Exception as e:
    print("wrong secret refused:", str(e)[:100], file=sys.stderr)
print(key["AccessKeyId"], key["SecretAccessKey"])
